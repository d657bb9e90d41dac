"""auth: users, password login (argon2id) and JWT access tokens.

`accounts.Accounts` holds the domain logic; `service` wires it onto RPC methods
(`python -m microservices.auth`).
"""
