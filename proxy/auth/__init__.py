"""Access tokens: the token service over MSAL, the login flows, and how their failures are told."""
