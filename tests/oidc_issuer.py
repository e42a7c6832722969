"""An OpenID Connect provider's token endpoint on 127.0.0.1, for tests of OAUTHBEARER: it gives
each client that shows its id and secret (HTTP Basic, ``grant_type=client_credentials``) a
JWT signed with RS256 by a key of its own, whose ``sub`` is the client's id. The broker checks
those tokens against ``jwks``, the JSON Web Key Set of that key. Keys and signatures are
OpenSSL's (the command), as the tests' certificates are."""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote

KEY_ID = "vigil-test"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenIssuer:
    """Tokens for ``clients`` (id -> secret), good for ``lifetime`` seconds, over HTTPS with
    ``tls``'s certificate and key if given, served while in a ``with`` block; a client of
    ``without_sub`` gets tokens with no ``sub`` claim. ``issued`` holds (client id, User-Agent)
    for each token given, ``refused`` the client ids refused; while ``down`` is set, every
    request is answered 503 (``down_answers`` counts them)."""

    def __init__(
        self,
        folder: Path,
        clients: dict[str, str],
        lifetime: int = 3600,
        tls: tuple[Path, Path] | None = None,
        without_sub: frozenset[str] = frozenset(),
    ) -> None:
        self.clients = clients
        self.without_sub = without_sub
        self.lifetime = lifetime
        self.issued: list[tuple[str, str]] = []
        self.refused: list[str] = []
        self.down = False  # answers 503 to every request while set
        self.down_answers = 0
        self._key = folder / "issuer.key"
        subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                        "rsa_keygen_bits:2048", "-out", str(self._key)],
                       check=True, capture_output=True)  # fmt: skip
        modulus = subprocess.run(["openssl", "rsa", "-in", str(self._key), "-noout", "-modulus"],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
        n = bytes.fromhex(modulus.strip().removeprefix("Modulus="))
        key = {"kty": "RSA", "kid": KEY_ID, "use": "sig", "alg": "RS256", "n": _b64(n), "e": "AQAB"}
        self.jwks = folder / "jwks.json"
        self.jwks.write_text(json.dumps({"keys": [key]}))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._scheme = "http"
        if tls is not None:  # (certificate, key)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
            self._scheme = "https"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self._server.server_address[1]}/oauth2/token"

    def __enter__(self) -> TokenIssuer:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def token_for(self, client_id: str) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}
        claims: dict[str, object] = {"iat": now, "exp": now + self.lifetime, "scope": "kafka"}
        if client_id not in self.without_sub:
            claims["sub"] = client_id
        signed = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self._key)],
                                   input=signed.encode(), check=True,
                                   capture_output=True).stdout  # fmt: skip
        return f"{signed}.{_b64(signature)}"

    def _client(self, authorization: str, form: dict[str, list[str]]) -> tuple[str, bool]:
        """The id of the client the request names, and whether its secret and grant are right."""
        scheme, _, encoded = authorization.partition(" ")
        try:
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        except ValueError:
            return "", False
        client_id, secret = unquote(client_id), unquote(secret)
        right = scheme.lower() == "basic" and self.clients.get(client_id) == secret
        return client_id, right and form.get("grant_type") == ["client_credentials"]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if issuer.down:
                    issuer.down_answers += 1
                    self._reply(503, {"error": "temporarily_unavailable"})
                    return
                form = parse_qs(body.decode())
                client_id, right = issuer._client(self.headers.get("Authorization", ""), form)
                if not right:
                    issuer.refused.append(client_id)
                    self._reply(401, {"error": "invalid_client"})
                    return
                issuer.issued.append((client_id, self.headers.get("User-Agent", "")))
                token = issuer.token_for(client_id)
                self._reply(200, {"access_token": token, "token_type": "Bearer",
                                  "expires_in": issuer.lifetime})  # fmt: skip

            def _reply(self, status: int, answer: dict[str, object]) -> None:
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # not on the test's output

        return Handler
