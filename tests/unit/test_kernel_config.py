from agentkernel.artifacts.kernel import config_fragment, missing_symbols, wanted_symbols


def test_fragment_has_what_microvms_need() -> None:
    wanted = wanted_symbols(config_fragment())
    for name in (
        "CONFIG_PVH",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_EXT4_FS",
        "CONFIG_OVERLAY_FS",
        "CONFIG_UNIX98_PTYS",
        "CONFIG_SECCOMP",
        "CONFIG_IPV6",
    ):
        assert wanted.get(name) == "y", name
    assert wanted["CONFIG_MODULES"] == "n"
    # ACPI device discovery (Firecracker 2.0, QEMU acpi=on) needs PCI in Linux 6.1; no hardware
    # a microVM lacks gets a driver
    assert (wanted["CONFIG_ACPI"], wanted["CONFIG_PCI"]) == ("y", "y")
    for absent in ("CONFIG_ACPI_BATTERY", "CONFIG_ACPI_FAN", "CONFIG_ACPI_THERMAL", "CONFIG_ACPI_VIDEO"):
        assert wanted[absent] == "n", absent


def test_missing_symbols_detects_dropped_and_forbidden() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=64\n"
    assert missing_symbols(fragment, "CONFIG_A=y\nCONFIG_C=64\n") == []
    assert missing_symbols(fragment, "CONFIG_B=y\nCONFIG_C=32\n") == [
        "CONFIG_A=y",
        "CONFIG_B=n",
        "CONFIG_C=64",
    ]
