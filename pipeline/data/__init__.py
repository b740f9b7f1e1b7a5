"""Datasets the project generates itself (ShapeWorld): train data for the shipped model and labelled eval data."""
