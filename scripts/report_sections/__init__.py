"""The sections scripts/make_reports.py writes into docs/, one module per part of the guide."""
