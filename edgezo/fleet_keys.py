"""A deployment's keys: a CA, the SuperLink's TLS certificate signed by it (valid for the given hosts), and one
EC (NIST P-384) key pair per device in OpenSSH format, as Flower's SuperNode authentication takes them. The
private keys are written readable by their owner only."""
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .runtime.errors import check


def _name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject, key, issuer, issuer_key, ca, hosts=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if hosts:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path, data, private=False):
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)
    return path


def write_keys(folder, devices, hosts=("localhost", "127.0.0.1")):
    check(devices >= 1, f"--devices must be >= 1, got {devices}")
    folder = Path(folder)
    check(not folder.exists() or not any(folder.iterdir()), f"{folder} exists and is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("edgezo fleet CA", ca_key, "edgezo fleet CA", ca_key, ca=True)
    server = _certificate(hosts[0], server_key, "edgezo fleet CA", ca_key, ca=False, hosts=hosts)
    written = [_write(folder / "ca.crt", ca.public_bytes(pem)), _write(folder / "server.pem", server.public_bytes(pem)),
               _write(folder / "server.key", server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                     serialization.NoEncryption()), private=True)]
    for k in range(devices):
        key = ec.generate_private_key(ec.SECP384R1())
        written.append(_write(folder / f"device-{k}", key.private_bytes(
            pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True))
        written.append(_write(folder / f"device-{k}.pub", key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)))
    return written
