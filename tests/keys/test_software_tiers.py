"""The two software tiers are siblings, not parent and child: only the
exportable tier can hand out key bytes, and nothing that checks for the
never-exported tier can be given the exportable one."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from custos.keys import ExportableKeyStore, KeyStore, MemoryKeyStore


def test_exportable_is_not_a_memory_store(tmp_path: Path) -> None:
    exportable = ExportableKeyStore(tmp_path)
    memory = MemoryKeyStore()
    assert isinstance(exportable, KeyStore) and isinstance(memory, KeyStore)
    assert not isinstance(exportable, MemoryKeyStore)
    assert not isinstance(memory, ExportableKeyStore)
    assert not hasattr(memory, "export_private_key")


def test_imported_memory_key_is_never_exported() -> None:
    memory = MemoryKeyStore()
    memory.import_key("adopted", ec.generate_private_key(ec.SECP256R1()))
    assert memory.info("adopted").store == "memory"
    assert not hasattr(memory, "export_private_key_der")


def test_exportable_keys_persist_and_export(tmp_path: Path) -> None:
    first = ExportableKeyStore(tmp_path)
    first.create("w", "ES256")
    der = first.export_private_key_der("w")
    again = ExportableKeyStore(tmp_path)
    assert again.export_private_key_der("w") == der
    assert (tmp_path / "w.pem").stat().st_mode & 0o077 == 0  # owner-only file
