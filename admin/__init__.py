"""The admin side of costwall: web UI, JSON admin API and invoices."""
