"""Sending through Microsoft Graph: settings, tokens' scopes, the HTTP client, the SMTP sink."""
