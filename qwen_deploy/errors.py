"""Errors a user can act on: each message names the problem and the fix."""


class QwenDeployError(Exception):
    """A failure caused by input or environment, reported to the user without a traceback."""


class CheckpointError(QwenDeployError):
    """The Hugging Face checkpoint folder cannot be exported faithfully."""


class ArtifactError(QwenDeployError):
    """An artifact folder is missing, incomplete or inconsistent with its manifest."""


class GGUFError(QwenDeployError):
    """A GGUF file cannot be converted into a Hugging Face Qwen2 checkpoint."""
