"""xoauth2-proxy: plain IMAP/POP3/SMTP logins in, OAuth 2.0 (XOAUTH2) logins out."""

__version__ = "0.1.0"
