"""What users run: the command line, the command registry, quickstart, reports, export, merging, data tools."""
