"""The commands behind `make bench`, `make reproduce` and `make reproduce-specialists`."""
