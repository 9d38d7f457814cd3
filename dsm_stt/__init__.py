"""dsm-stt: real-time speech-to-text for Kyutai's Delayed Streams Modeling STT models."""

__version__ = "0.1.0"
