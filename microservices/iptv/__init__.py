"""iptv: the demo domain service (channels, categories, programme guide, search, favourites).

`catalog.Catalog` holds the domain logic, `seed` writes the demo data once, and
`service` wires the catalog onto RPC methods (`python -m microservices.iptv`).
"""
