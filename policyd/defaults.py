"""Defaults shared by policyd's server and its clients (xlbctl), with no imports, so that
a client reads them without loading the server."""

DEFAULT_LISTEN = "127.0.0.1:50151"  # where xlb-policyd serves and xlbctl dials
DEFAULT_DB = "/var/lib/xlb/policyd.db"  # xlb-policyd's SQLite file
ENV_SERVER = "XLB_POLICYD"  # xlbctl's server address, when --server is not given
