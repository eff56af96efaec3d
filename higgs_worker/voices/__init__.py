"""Voices: a job's voice value resolved to audio or words (``resolve``: presets, profiles, OpenAI names, data
URIs, URLs through ``safe_fetch``), and the saved voices of the library (``library``)."""
