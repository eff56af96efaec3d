"""What a job asks the model to read: the validated request and its resolved voices, as the model's terms.

Why here: the job's fields are the worker's (``scene_prompt``, ``voice_description``, ``chunk_method`` …) and
the prompt's terms are the model's (:class:`boson_multimodal.prompt.PromptRequest`,
:class:`boson_multimodal.longform.Chunking`). Generation and dry runs must make the same translation, or a
dry run would show something other than what the model reads; so both call these two functions. Nothing
here imports torch: a dry run never loads it.
"""

from __future__ import annotations

from boson_multimodal.longform import Chunking
from boson_multimodal.prompt import DEFAULT_SCENE, PromptRequest, SpeakerVoice, Voice, VoiceDescription
from boson_multimodal.transcript import normalize_transcript
from higgs_worker.job.schema import TTSRequest
from higgs_worker.voices.resolve import DescribedVoice, ResolvedVoice


def prompt_request(request: TTSRequest, voices: list[ResolvedVoice]) -> PromptRequest:
    """The prompt's terms: normalised text, the scene, and one voice per speaker.

    ``scene_prompt`` absent gives the upstream script's default scene; an empty one gives none (the script's
    ``--scene_prompt empty``). ``voices`` are the resolved ``ref_audio`` entries, in order; the
    ``voice_description`` entries fill the speakers after them.
    """
    speakers: list[SpeakerVoice] = [_speaker_voice(voice) for voice in voices]
    for index, description in enumerate(request.voice_descriptions):
        if index >= len(speakers) and description is not None:
            speakers.append(VoiceDescription(description.strip()))
    scene = DEFAULT_SCENE if request.scene_prompt is None else request.scene_prompt.strip() or None
    return PromptRequest(
        text=normalize_transcript(request.transcript),
        scene=scene,
        voices=tuple(speakers),
        voices_in_system=request.ref_audio_in_system_message,
    )


def _speaker_voice(voice: ResolvedVoice) -> SpeakerVoice:
    if isinstance(voice, DescribedVoice):
        return VoiceDescription(voice.text)
    return Voice(voice.waveform, voice.sample_rate, voice.text)


def chunking_for(request: TTSRequest, text: str, sentence_chars: int) -> Chunking | None:
    """How the (normalised) ``text`` is cut into pieces, or None for one generation.

    ``sentence`` (the default) cuts only a text longer than ``sentence_chars`` (``LONGFORM_CHUNK_CHARS``);
    ``speaker`` and ``word`` always cut, as the script does; ``none`` never does.
    """
    if request.chunk_method == "none" or (request.chunk_method == "sentence" and len(text) <= sentence_chars):
        return None
    return Chunking(
        method=request.chunk_method,
        max_chars=sentence_chars,
        max_words=request.chunk_max_words,
        max_turns=request.chunk_max_turns,
        buffer_size=request.chunk_buffer,
    )
