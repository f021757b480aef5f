"""Metering: meter definitions and their SQL, migrations, backfills, the migration lease and
ledger, usage queries."""
