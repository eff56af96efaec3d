"""Captions from word timestamps: SubRip (``srt``) and WebVTT (``vtt``) text.

Cues follow common subtitle guidance (the BBC's and Netflix's: at most 42 characters a line, two lines, a
new cue at a sentence end and at every change of speaker, none shorter than the words it shows). A cue holds
at most ``MAX_CUE_WORDS`` words, so each one is on screen briefly enough to follow speech; a long pause (over
``MAX_GAP_S``) also starts a new cue. In WebVTT each cue of a dialogue names its speaker with a voice tag
(``<v SPEAKER0>``); SubRip has no such tag and shows the text alone. With an S3 target the captions are
also uploaded beside the audio.
"""

from __future__ import annotations

from typing import Any, Literal

from higgs_worker.delivery import S3ClientFactory, S3Target, default_s3_client, describe_s3_failure
from higgs_worker.quality.alignment import WordTime
from higgs_worker.quality.words import CJK, join_words

CaptionFormat = Literal["srt", "vtt"]
MAX_LINE_CHARS = 42
MAX_LINES = 2
MAX_CUE_WORDS = 12
MAX_GAP_S = 1.0
SENTENCE_END = (".", "!", "?", "…")


def cues(words: list[WordTime]) -> list[list[WordTime]]:
    """The words grouped into cues (see the module docstring)."""
    groups: list[list[WordTime]] = []
    current: list[WordTime] = []
    for word in words:
        if current and _starts_new_cue(current, word):
            groups.append(current)
            current = []
        current.append(word)
    if current:
        groups.append(current)
    return groups


def _starts_new_cue(current: list[WordTime], word: WordTime) -> bool:
    last = current[-1]
    if word.speaker != last.speaker or last.word.endswith(SENTENCE_END) or len(current) >= MAX_CUE_WORDS:
        return True
    if word.start_s - last.end_s > MAX_GAP_S:
        return True
    return len(_lines([*current, word])) > MAX_LINES


def _lines(words: list[WordTime]) -> list[str]:
    """Words wrapped at MAX_LINE_CHARS columns (a Chinese or Japanese character takes two; a single longer
    word gets a line of its own)."""
    lines: list[list[str]] = []
    for word in words:
        if lines and _columns(join_words([*lines[-1], word.word])) <= MAX_LINE_CHARS:
            lines[-1].append(word.word)
        else:
            lines.append([word.word])
    return [join_words(line) for line in lines]


def _columns(text: str) -> int:
    return len(text) + len(CJK.findall(text))


def render(words: list[WordTime], fmt: CaptionFormat) -> str:
    """The captions file's text."""
    dialogue = any(word.speaker is not None for word in words)
    blocks = []
    for number, group in enumerate(cues(words), start=1):
        start, end = group[0].start_s, max(group[-1].end_s, group[0].start_s + 0.001)
        text = "\n".join(_lines(group))
        if fmt == "srt":
            blocks.append(f"{number}\n{_timestamp(start, ',')} --> {_timestamp(end, ',')}\n{text}\n")
        else:
            voice = f"<v SPEAKER{group[0].speaker}>" if dialogue and group[0].speaker is not None else ""
            blocks.append(f"{_timestamp(start, '.')} --> {_timestamp(end, '.')}\n{voice}{text}\n")
    body = "\n".join(blocks)
    return body if fmt == "srt" else "WEBVTT\n\n" + body


def _timestamp(seconds: float, decimal: str) -> str:
    millis = round(seconds * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{millis:03d}"


MIMETYPES = {"srt": "application/x-subrip", "vtt": "text/vtt"}


def upload_captions(
    captions: str,
    fmt: CaptionFormat,
    target: S3Target,
    presign_expiry_s: int,
    s3_client_factory: S3ClientFactory = default_s3_client,
) -> dict[str, Any]:
    """Put the captions beside the clip in S3 as ``<key>.srt`` / ``<key>.vtt``: ``captions_s3`` says where
    (bucket, key, uri, presigned url); a failed upload is reported as ``captions_s3_error`` (the captions
    are in the output anyway), never as a failed job."""
    from botocore.exceptions import BotoCoreError, ClientError

    key = f"{target.key}.{fmt}"
    try:
        client = s3_client_factory()
        client.put_object(
            Bucket=target.bucket,
            Key=key,
            Body=captions.encode(),
            ContentType=f"{MIMETYPES[fmt]}; charset=utf-8",
        )
        url = client.generate_presigned_url(
            "get_object", Params={"Bucket": target.bucket, "Key": key}, ExpiresIn=presign_expiry_s
        )
    except (BotoCoreError, ClientError, ValueError) as error:
        return {
            "captions_s3_error": f"upload to bucket '{target.bucket}' failed: {describe_s3_failure(error)}"
        }
    return {
        "captions_s3": {"bucket": target.bucket, "key": key, "uri": f"s3://{target.bucket}/{key}", "url": url}
    }
