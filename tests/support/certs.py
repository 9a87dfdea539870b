"""Client certificates with chosen names, signed by a trustme CA (for the mTLS tests).

trustme issues neither URI SANs nor certificates without a SAN; the tests of the mTLS identity
need both (a SPIFFE ID, a CN-only certificate), and the fuzz tests names that cryptography's own
checks refuse (non-ASCII SANs, empty or very long CNs, several CNs). And policy rules whose
subjects are certificate names (the mTLS name tests).
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.stack import NAMESPACE, SERVICE_ACCOUNT


def client_cert(
    ca: trustme.CA,
    *,
    cn: str | None = None,
    uris: tuple[str, ...] = (),
    dns: tuple[str, ...] = (),
    more_cns: tuple[str, ...] = (),
    unchecked: bool = False,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a client certificate signed by `ca`: these URI SANs and
    DNS SANs (no SAN extension without any), and this subject CN (none if None) followed by
    `more_cns`. `unchecked`: the names are written as given, without cryptography's checks
    (A-labels for SANs, 1 to 64 characters for a CN), as a careless or hostile CA could."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "token-broker tests")]
    for common_name in (*([cn] if cn is not None else []), *more_cns):
        if unchecked:
            with warnings.catch_warnings():  # cryptography warns about a CN's length
                warnings.simplefilter("ignore")
                attribute = x509.NameAttribute(NameOID.COMMON_NAME, common_name, _validate=False)
        else:
            attribute = x509.NameAttribute(NameOID.COMMON_NAME, common_name)
        subject.append(attribute)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    uri_name = x509.UniformResourceIdentifier
    dns_name = x509.DNSName
    names: list[x509.GeneralName] = (
        [uri_name._init_without_validation(u) for u in uris]
        + [dns_name._init_without_validation(d) for d in dns]
        if unchecked
        else [uri_name(u) for u in uris] + [dns_name(d) for d in dns]
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


# --- policy rules for certificate names ----------------------------------------------------------

CI_RULE = {
    "name": "ci-spiffe",
    "subjects": [{"method": "mtls", "name": "spiffe://example.org/ci/*"}],
    "namespaces": [NAMESPACE],
    "serviceAccounts": [SERVICE_ACCOUNT],
    "allowApiServerAudience": True,
}


def rule(name: str, *subjects: dict[str, Any]) -> dict[str, Any]:
    return {**CI_RULE, "name": name, "subjects": list(subjects)}
