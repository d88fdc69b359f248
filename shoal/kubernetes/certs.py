"""Certificates for TLS between an application's pods: a per-application CA and the pod
certificate it signs, in the layout of a ``kubernetes.io/tls`` Secret (``tls.crt``,
``tls.key``, ``ca.crt``, what cert-manager writes).

Used by ``shoal k8s build --create-secret`` (kept in the local secrets file, see
:mod:`shoal.kubernetes.secretstore`) and by the pod simulation. Needs the ``cryptography``
package, imported only here and only when certificates are made.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CA_DAYS",
    "POD_CERT_DAYS",
    "RENEW_BEFORE_DAYS",
    "TlsMaterial",
    "expires",
    "issue_pod_cert",
    "needs_renewal",
    "new_material",
]

# The CA outlives many pod certificates: replacing it needs a two-step rotation (docs/kubernetes.md).
CA_DAYS = 3650
POD_CERT_DAYS = 365
# A stored pod certificate this close to its end is re-issued by the next build.
RENEW_BEFORE_DAYS = 30


def _crypto() -> Any:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise ImportError(
            "generating the RPC certificates needs the 'cryptography' package: install shoal's kubernetes extra "
            "(pip install -e '.[kubernetes]' in a clone of shoal) or use --tls cert-manager, or create the Secret "
            "yourself"
        ) from None
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TlsMaterial:
    """A CA (its key stays on the build machine) and the pod certificate it signed, as PEM text."""

    ca_key: str
    ca_crt: str
    tls_key: str
    tls_crt: str

    def secret_data(self) -> dict[str, str]:
        """The keys of the ``kubernetes.io/tls`` Secret every pod mounts (no CA key)."""
        return {"tls.crt": self.tls_crt, "tls.key": self.tls_key, "ca.crt": self.ca_crt}


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: Any) -> str:
    _, _, serialization, _, _, _ = _crypto()
    pem: bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    return pem.decode()


def _cert_pem(cert: Any) -> str:
    _, _, serialization, _, _, _ = _crypto()
    pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return pem.decode()


def new_material(app: str, namespace: str) -> TlsMaterial:
    """A fresh CA for application ``app`` and a pod certificate signed by it (ECDSA P-256)."""
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"shoal {namespace}/{app} RPC CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    ca_key, ca_crt = _key_pem(key), _cert_pem(cert)
    tls_key, tls_crt = issue_pod_cert(ca_key, ca_crt, app, namespace)
    return TlsMaterial(ca_key=ca_key, ca_crt=ca_crt, tls_key=tls_key, tls_crt=tls_crt)


def issue_pod_cert(ca_key_pem: str, ca_crt_pem: str, app: str, namespace: str) -> tuple[str, str]:
    """(key, certificate) of a pod certificate signed by the CA, good for server and client auth."""
    x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID = _crypto()
    ca_key = serialization.load_pem_private_key(ca_key_pem.encode(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca_crt_pem.encode())
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    # Peers check the CA, not names (pod IPs change); the name is for people reading the certificate.
    service = f"{app}.{namespace}.svc"
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"shoal {namespace}/{app} pod")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(min(now + datetime.timedelta(days=POD_CERT_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(service)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _key_pem(key), _cert_pem(cert)


def expires(cert_pem: str) -> datetime.datetime:
    """When the (first) certificate in ``cert_pem`` stops being valid (UTC)."""
    x509, _, _, _, _, _ = _crypto()
    end: datetime.datetime = x509.load_pem_x509_certificate(cert_pem.encode()).not_valid_after_utc
    return end


def needs_renewal(cert_pem: str) -> bool:
    """Whether a stored certificate ends within :data:`RENEW_BEFORE_DAYS`."""
    return expires(cert_pem) - _now() < datetime.timedelta(days=RENEW_BEFORE_DAYS)
