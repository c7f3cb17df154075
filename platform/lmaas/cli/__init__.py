"""The `lmaas` command line: a short map from command to library function."""
