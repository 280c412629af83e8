"""Data: readers, format converters, chat-template encoding and the shared ``PreferenceDataModule``."""

from rlft.data.datamodule import PreferenceDataModule

__all__ = ["PreferenceDataModule"]
