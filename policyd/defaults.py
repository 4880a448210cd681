"""Defaults shared by policyd's server and its clients (xlbctl), with no imports, so that
a client reads them without loading the server."""

# where xlb-policyd serves and xlbctl dials: a unix socket (local trust, mode 0660); TCP
# needs client certificates or tokens (docs/security.md)
DEFAULT_LISTEN = "unix:/run/xlb/policyd.sock"
DEFAULT_DB = "/var/lib/xlb/policyd.db"  # xlb-policyd's SQLite file
ENV_SERVER = "XLB_POLICYD"  # xlbctl's server address, when --server is not given
