"""TLS for the emulated api-ssl service.

Without a certificate RouterOS's api-ssl offers only anonymous Diffie-Hellman cipher suites
(routeros-research.md §1.1, mktxp PR #263 for 7.19.4). `anonymous_dh_context()` builds a
server context that does the same: no certificate, TLS 1.2 at most (TLS 1.3 has no anonymous
suites), ciphers `ADH` only, with the RFC 7919 ffdhe2048 group as DH parameters.

A client gets in only with anonymous DH enabled at security level 0, no hostname check and
no verification, e.g. `set_ciphers("ALL:ADH:@SECLEVEL=0")`. `DEFAULT:ADH:@SECLEVEL=0` does
not work under OpenSSL 3: `DEFAULT` ends in `!aNULL`, which removes anonymous suites for good.
"""

from __future__ import annotations

import os
import ssl
import tempfile

# RFC 7919 appendix A.1 (ffdhe2048), as PKCS#3 DH parameters.
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def anonymous_dh_context() -> ssl.SSLContext:
    """A server context offering only anonymous-DH suites, like api-ssl with no certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ADH:@SECLEVEL=0")
    # load_dh_params reads only from a file.
    fd, path = tempfile.mkstemp(suffix=".pem")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(FFDHE2048)
        context.load_dh_params(path)
    finally:
        os.unlink(path)
    return context


def anonymous_dh_client_context() -> ssl.SSLContext:
    """The client side that works against `anonymous_dh_context()` (and RouterOS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_ciphers("ALL:ADH:@SECLEVEL=0")
    return context
