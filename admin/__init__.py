"""The admin side of costwall: web UI, JSON admin API and invoices.

``admin.app.create_admin_app(gw)`` builds it as one aiohttp sub-application that the
gateway mounts under ``/admin``; importing this package does no I/O.
"""
