"""One thin Typer command per module (the table is in `loracli.cli`)."""
