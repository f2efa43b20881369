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
    assert wanted["CONFIG_PCI"] == "n"


def test_missing_symbols_detects_dropped_and_forbidden() -> None:
    fragment = "CONFIG_A=y\nCONFIG_B=n\nCONFIG_C=64\n"
    assert missing_symbols(fragment, "CONFIG_A=y\nCONFIG_C=64\n") == []
    assert missing_symbols(fragment, "CONFIG_B=y\nCONFIG_C=32\n") == [
        "CONFIG_A=y",
        "CONFIG_B=n",
        "CONFIG_C=64",
    ]
