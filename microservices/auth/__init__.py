"""auth: users, password login (argon2id), sessions with rotating refresh tokens,
API keys, revocation and the JWT signing keyring.

`accounts.Accounts` holds the operations (over `users`, `sessions`, `api_keys`
and `common.tokens.Keyring`); `service` wires them onto RPC methods
(`python -m microservices.auth`); `admin` is the operator CLI
(`python -m microservices.auth.admin`).
"""
