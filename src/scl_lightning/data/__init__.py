"""LightningDataModules for the datasets SCL is trained and evaluated on."""

from .digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
