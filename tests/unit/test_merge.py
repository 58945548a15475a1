"""merge.py against real nmap 7.93 captures (tests/fixtures/nmap, see regen.sh) and synthetic reports
(tests/support/xmlgen.py). Each merged report is checked three ways: the ScanLedger rules of contract §5.2
written out here, the independent fake ScanLedger (tests/fakes/scanledger.py), and python-nmap as an
oracle reading the same ports, services and scripts from the raw phase files."""

from __future__ import annotations

import shutil
import tracemalloc
import xml.etree.ElementTree as ET
from pathlib import Path

import nmap
import pytest

from falcoria_worker.errors import ScanFailed
from falcoria_worker.merge import PortRow, merge_reports, phase1_ports, summary
from tests.fakes.scanledger import ReportRejected, check_report
from tests.support import xmlgen

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nmap"
TARGET = "127.0.0.21"
PORT_STATES = {"open", "closed", "filtered", "unfiltered", "open|filtered", "closed|filtered"}
HOST_TAIL_ORDER = ["os", "uptime", "distance", "tcpsequence", "ipidsequence", "tcptssequence", "hostscript"]


# ---------------------------------------------------------------------------------------------------------
# helpers


def ports_of(xml: Path, target: str) -> list:
    """Phase 1's ports to probe, [] when there is no host at all."""
    return phase1_ports(xml, target) or []


def fixture(name: str) -> Path:
    return FIXTURES / name


def merged(
    tmp_path: Path,
    phase1: Path,
    phase2: Path | None,
    *,
    target: str = TARGET,
    hostnames: tuple[str, ...] = (),
) -> ET.Element:
    out = tmp_path / "merged.xml"
    merge_reports(phase1, phase2, out, target_ip=target, hostnames=hostnames)
    data = out.read_bytes()
    assert_scanledger_accepts(data)
    return ET.fromstring(data)  # noqa: S314 - our own test output


def assert_scanledger_accepts(data: bytes) -> None:
    """Contract §5.2/§5.2a, written out independently of the fake, plus our own output rules."""
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n')
    assert b"<!DOCTYPE" not in data
    assert b"<?xml-stylesheet" not in data
    data.decode("utf-8")
    root = ET.fromstring(data)  # noqa: S314 - our own test output
    for attr in ("scanner", "args", "start", "startstr", "version", "xmloutputversion"):
        assert root.get(attr), f"nmaprun@{attr}"
    scaninfo = root.find("scaninfo")
    assert scaninfo is not None
    for attr in ("type", "protocol", "numservices", "services"):
        assert scaninfo.get(attr) is not None, f"scaninfo@{attr}"
    for tag in ("verbose", "debugging"):
        level = root.find(tag)
        assert level is not None
        assert level.get("level") is not None
    assert root.find(".//taskprogress") is None
    for host in root.findall("host"):
        assert int(host.get("starttime", "x")) <= int(host.get("endtime", "x"))
        status = host.find("status")
        assert status is not None
        assert all(status.get(a) is not None for a in ("state", "reason", "reason_ttl"))
        address = host.find("address")
        assert address is not None
        assert address.get("addr")
        assert address.get("addrtype")
        assert host.find("ports") is not None
        for port in host.iter("port"):
            assert port.get("protocol")
            int(port.get("portid", "x"))
            state = port.find("state")
            assert state is not None
            assert state.get("state") in PORT_STATES
            assert state.get("reason") is not None
            int(state.get("reason_ttl", "x"))
        for script in host.iter("script"):
            assert script.get("id")
            assert script.get("output") is not None
            assert all(elem.get("key") for elem in script.iter("elem")), script.get("id")
    assert check_report(data)  # the fake ScanLedger agrees


def port(root: ET.Element, protocol: str, portid: int) -> ET.Element:
    found = root.find(f"host/ports/port[@protocol='{protocol}'][@portid='{portid}']")
    assert found is not None, f"{protocol}/{portid} missing"
    return found


def script_ids(port_elem: ET.Element) -> list[str]:
    return [script.get("id", "") for script in port_elem.findall("script")]


def edited(tmp_path: Path, source: Path, name: str, old: str, new: str) -> Path:
    text = source.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {source.name}"
    target = tmp_path / name
    target.write_text(text.replace(old, new), encoding="utf-8")
    return target


def python_nmap(data: bytes) -> dict:
    if shutil.which("nmap") is None:  # a package build's check runs without it
        pytest.skip("python-nmap's PortScanner wants the nmap binary, even only to parse XML")
    return nmap.PortScanner().analyse_nmap_xml_scan(data.decode("utf-8"))["scan"]


# ---------------------------------------------------------------------------------------------------------
# real captures


def test_real_capture_keeps_every_port_script_and_phase1_args(tmp_path: Path) -> None:
    root = merged(tmp_path, fixture("phase1.xml"), fixture("phase2.xml"), hostnames=("web.test",))

    # phase 1's truthful run: ScanLedger derives not_shown_ports from this -p list (contract §5.2)
    assert root.get("args") == "nmap -n -Pn -p 1-100,12222,18080 -oX phase1.xml 127.0.0.21"
    assert root.find("scaninfo").get("services") == "1-100,12222,18080"  # type: ignore[union-attr]
    assert "0.06 seconds" in root.find("runstats/finished").get("summary", "")  # type: ignore[union-attr]
    host = root.find("host")
    assert host is not None
    assert host.find("ports/extraports").get("count") == "100"  # type: ignore[union-attr]
    assert host.find("times").get("srtt") == "5"  # type: ignore[union-attr]

    ssh = port(root, "tcp", 12222)
    assert ssh.find("service").get("product") == "OpenSSH"  # type: ignore[union-attr]
    assert len(ssh.findall("service/cpe")) == 2
    web = port(root, "tcp", 18080)
    assert web.find("service").get("product") == "SimpleHTTPServer"  # type: ignore[union-attr]
    assert script_ids(web) == ["http-server-header", "http-title"]
    header = web.find("script[@id='http-server-header']/elem")
    assert header is not None
    assert header.get("key") == "1"
    assert header.text == "SimpleHTTP/0.6 Python/3.11.7"
    assert web.find("script[@id='http-title']/elem").get("key") == "title"  # type: ignore[union-attr]


def test_raw_phase2_capture_is_what_scanledger_refuses() -> None:
    """The reason for the keyless-elem fix: the real capture itself gets a 500."""
    with pytest.raises(ReportRejected) as rejected:
        check_report(fixture("phase2.xml").read_bytes())
    assert rejected.value.status == 500


def test_host_times_from_phase1_with_phase2_endtime(tmp_path: Path) -> None:
    host = merged(tmp_path, fixture("phase1.xml"), fixture("phase2.xml")).find("host")
    assert host is not None
    assert host.get("starttime") == "1795835282"  # phase 1
    assert host.get("endtime") == "1795835323"  # phase 2 finished probing later
    assert host.find("status").get("reason") == "user-set"  # type: ignore[union-attr]


def test_os_detection_reaches_the_report_in_nmap_order(tmp_path: Path) -> None:
    root = merged(tmp_path, fixture("phase1.xml"), fixture("phase2-os.xml"))
    host = root.find("host")
    assert host is not None
    tags = [child.tag for child in host]
    assert tags[:4] == ["status", "address", "hostnames", "ports"]
    assert tags[4:] == ["os", "uptime", "distance", "tcpsequence", "ipidsequence", "tcptssequence", "times"]
    assert host.find("os/osmatch").get("name") == "Linux 5.0 - 5.2"  # type: ignore[union-attr]
    assert len(host.findall("os/osmatch")) == 10
    assert host.find("times").get("srtt") == "5"  # times stay phase 1's  # type: ignore[union-attr]


def test_udp_open_filtered_gets_service_detection(tmp_path: Path) -> None:
    assert ports_of(fixture("phase1-udp.xml"), TARGET) == [("udp", 5353), ("udp", 5354)]
    root = merged(tmp_path, fixture("phase1-udp.xml"), fixture("phase2-udp.xml"))
    assert "-sU" in root.get("args", "")
    assert port(root, "udp", 5353).find("service").get("servicefp", "").startswith("SF-Port5353-UDP")  # type: ignore[union-attr]
    silent = port(root, "udp", 5354)
    assert silent.find("state").get("state") == "open|filtered"  # type: ignore[union-attr]
    assert silent.find("service").get("method") == "probed"  # type: ignore[union-attr]
    assert port(root, "udp", 5355).find("state").get("state") == "closed"  # phase 1 only  # type: ignore[union-attr]


def test_phase1_ports_on_real_captures() -> None:
    assert ports_of(fixture("phase1.xml"), TARGET) == [("tcp", 12222), ("tcp", 18080)]
    assert ports_of(fixture("phase1.xml"), "127.0.0.22") == []  # another host's ports are not ours
    assert phase1_ports(fixture("phase1.xml"), TARGET) is not None


def test_summary_rows_of_merged_report(tmp_path: Path) -> None:
    out = tmp_path / "merged.xml"
    merge_reports(fixture("phase1.xml"), fixture("phase2.xml"), out, target_ip=TARGET, hostnames=())
    assert summary(out) == [
        PortRow("tcp", 12222, "open", "ssh", "OpenSSH", "9.2p1 Debian 2+deb12u3"),
        PortRow("tcp", 18080, "open", "http", "SimpleHTTPServer", "0.6"),
    ]


@pytest.mark.parametrize(
    ("phase1", "phase2"),
    [("phase1.xml", "phase2.xml"), ("phase1.xml", "phase2-os.xml"), ("phase1-udp.xml", "phase2-udp.xml")],
)
def test_python_nmap_oracle_sees_phase2_services_and_phase1_states(
    tmp_path: Path, phase1: str, phase2: str
) -> None:
    out = tmp_path / "merged.xml"
    merge_reports(fixture(phase1), fixture(phase2), out, target_ip=TARGET, hostnames=("o.test",))
    result = python_nmap(out.read_bytes())[TARGET]
    raw1 = python_nmap(fixture(phase1).read_bytes())[TARGET]
    raw2 = python_nmap(fixture(phase2).read_bytes())[TARGET]
    for proto in ("tcp", "udp"):
        for portid, before in raw1.get(proto, {}).items():
            expected = raw2.get(proto, {}).get(portid, before)
            got = result[proto][portid]
            for field in ("state", "name", "product", "version", "extrainfo", "cpe"):
                assert got[field] == expected[field], (proto, portid, field)
            assert got.get("script") == expected.get("script")  # every script, same output
    assert {"name": "o.test", "type": "user"} in result["hostnames"]
    if "osmatch" in raw2:
        assert result["osmatch"] == raw2["osmatch"]


# ---------------------------------------------------------------------------------------------------------
# phase 2 missing, broken or partial


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.8, 0.97, 0.999])
def test_truncated_phase2_is_treated_as_absent(tmp_path: Path, fraction: float) -> None:
    cut = xmlgen.truncated_copy(fixture("phase2-os.xml"), tmp_path / "cut.xml", fraction)
    with_cut = merged(tmp_path, fixture("phase1.xml"), cut)
    without = (tmp_path / "merged.xml").read_bytes()
    merge_reports(fixture("phase1.xml"), None, tmp_path / "none.xml", target_ip=TARGET, hostnames=())
    assert without == (tmp_path / "none.xml").read_bytes()
    assert with_cut.find("host/os") is None
    assert port(with_cut, "tcp", 12222).find("service") is None  # phase 1 had no table guess


def test_missing_phase2_file_is_treated_as_absent(tmp_path: Path) -> None:
    root = merged(tmp_path, fixture("phase1.xml"), tmp_path / "never-written.xml")
    assert port(root, "tcp", 18080).find("service").get("method") == "table"  # type: ignore[union-attr]


def test_phase1_only(tmp_path: Path) -> None:
    root = merged(tmp_path, fixture("phase1.xml"), None, hostnames=("only.test",))
    assert [p.get("portid") for p in root.iter("port")] == ["12222", "18080"]
    assert root.find("host/hostnames/hostname").attrib == {"name": "only.test", "type": "user"}  # type: ignore[union-attr]
    assert root.find("host").get("endtime") == "1795835282"  # type: ignore[union-attr]


def test_phase2_of_another_host_is_ignored(tmp_path: Path) -> None:
    other = edited(tmp_path, fixture("phase2.xml"), "other.xml", 'addr="127.0.0.21"', 'addr="127.0.0.99"')
    root = merged(tmp_path, fixture("phase1.xml"), other)
    assert port(root, "tcp", 18080).find("script") is None


# ---------------------------------------------------------------------------------------------------------
# phase 1 problems


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.9, 0.99])
def test_truncated_phase1_raises_scanfailed_and_leaves_no_output(tmp_path: Path, fraction: float) -> None:
    cut = xmlgen.truncated_copy(fixture("phase1.xml"), tmp_path / "cut.xml", fraction)
    out = tmp_path / "merged.xml"
    with pytest.raises(ScanFailed, match="phase 1 XML is truncated or malformed"):
        merge_reports(cut, fixture("phase2.xml"), out, target_ip=TARGET, hostnames=())
    assert not out.exists()
    with pytest.raises(ScanFailed, match="truncated"):
        ports_of(cut, TARGET)
    with pytest.raises(ScanFailed, match="truncated"):
        phase1_ports(cut, TARGET)


def test_phase1_that_is_not_nmap_xml(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.xml"
    bogus.write_text("<html><body>no</body></html>")
    with pytest.raises(ScanFailed, match="not an nmap report"):
        ports_of(bogus, TARGET)
    with pytest.raises(ScanFailed, match="cannot read"):
        phase1_ports(tmp_path / "absent.xml", TARGET)


def test_no_host_in_phase1(tmp_path: Path) -> None:
    text = fixture("phase1.xml").read_text()
    empty = tmp_path / "empty.xml"
    empty.write_text(text[: text.index("<host ")] + text[text.index("<runstats>") :])
    assert phase1_ports(empty, TARGET) is None
    assert ports_of(empty, TARGET) == []
    out = tmp_path / "merged.xml"
    merge_reports(empty, None, out, target_ip=TARGET, hostnames=())
    with pytest.raises(ReportRejected) as rejected:
        check_report(out.read_bytes())
    assert rejected.value.status == 400  # nothing to import, and ScanLedger says so without a 500


def test_host_without_ports_and_times_gets_required_elements(tmp_path: Path) -> None:
    text = fixture("phase1.xml").read_text()
    start, end = text.index("<ports>"), text.index("</ports>") + len("</ports>")
    bare = tmp_path / "bare.xml"
    bare.write_text(
        text[:start]
        .replace(' starttime="1795835282" endtime="1795835282"', "")
        .replace("<hostnames>\n</hostnames>\n", "")
        + text[end:]
    )
    host = merged(tmp_path, bare, None, hostnames=("h.test",)).find("host")
    assert host is not None
    assert host.get("starttime") == host.get("endtime") == "1795835282"  # nmaprun@start, a true bound
    assert [child.tag for child in host] == ["status", "address", "hostnames", "ports", "times"]
    assert host.find("hostnames/hostname").get("name") == "h.test"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------------
# sanitising and hostnames


def test_keyless_elems_get_indexes_among_unkeyed_siblings_in_both_phases(tmp_path: Path) -> None:
    script = (
        '<script id="multi" output="x"><elem key="a">A</elem><elem>first</elem>'
        '<table key="t"><elem>in table</elem><elem key="k">K</elem><elem>second in table</elem></table>'
        "<table><elem>unkeyed table</elem></table><elem>second &amp; é</elem></script>"
    )
    p1 = edited(
        tmp_path,
        fixture("phase1.xml"),
        "p1.xml",
        '"syn-ack" reason_ttl="64"/></port>',
        (f'"syn-ack" reason_ttl="64"/>{script}</port>'),
    )
    p1_root = merged(tmp_path, p1, None)
    p2_root = merged(
        tmp_path,
        fixture("phase1.xml"),
        edited(
            tmp_path,
            fixture("phase2.xml"),
            "p2.xml",
            "<cpe>cpe:/o:linux:linux_kernel</cpe></service>",
            f"<cpe>cpe:/o:linux:linux_kernel</cpe></service>{script}",
        ),
    )
    for root in (p1_root, p2_root):
        multi = port(root, "tcp", 12222).find("script[@id='multi']")
        assert multi is not None
        assert [(e.get("key"), e.text) for e in multi.findall("elem")] == [
            ("a", "A"),
            ("1", "first"),
            ("2", "second & é"),
        ]
        keyed = multi.find("table[@key='t']")
        assert [(e.get("key"), e.text) for e in keyed.findall("elem")] == [  # type: ignore[union-attr]
            ("1", "in table"),
            ("k", "K"),
            ("2", "second in table"),
        ]
        assert multi.find("table[2]/elem").get("key") == "1"  # type: ignore[union-attr]


def test_hostnames_merge_ptr_names_and_task_names_without_duplicates(tmp_path: Path) -> None:
    p1 = edited(
        tmp_path,
        fixture("phase1.xml"),
        "p1.xml",
        "<hostnames>\n</hostnames>",
        '<hostnames>\n<hostname name="ptr.example" type="PTR"/>\n</hostnames>',
    )
    p2 = edited(
        tmp_path,
        fixture("phase2.xml"),
        "p2.xml",
        "<hostnames>\n</hostnames>",
        '<hostnames><hostname name="PTR.example." type="PTR"/>'
        '<hostname name="other.example" type="PTR"/></hostnames>',
    )
    root = merged(tmp_path, p1, p2, hostnames=("ptr.example", "task.example", "TASK.example"))
    names = [h.attrib for h in root.findall("host/hostnames/hostname")]
    assert names == [
        {"name": "ptr.example", "type": "PTR"},
        {"name": "other.example", "type": "PTR"},
        {"name": "task.example", "type": "user"},
    ]


def test_missing_hostnames_element_is_created_after_address(tmp_path: Path) -> None:
    p1 = edited(tmp_path, fixture("phase1.xml"), "p1.xml", "<hostnames>\n</hostnames>\n", "")
    host = merged(tmp_path, p1, fixture("phase2.xml"), hostnames=("a.test",)).find("host")
    assert host is not None
    assert [child.tag for child in host][:4] == ["status", "address", "hostnames", "ports"]


def test_ipv6_target_matched_by_normalised_address(tmp_path: Path) -> None:
    ports = xmlgen.open_tcp([22, 80])
    p1 = xmlgen.phase1(tmp_path / "p1.xml", "::1", [*ports, ("tcp", 81, "closed")])
    p2 = xmlgen.phase2(tmp_path / "p2.xml", "0:0:0:0:0:0:0:1", ports)
    assert ports_of(p1, "0000:0000::0001") == [("tcp", 22), ("tcp", 80)]
    root = merged(tmp_path, p1, p2, target="0::1", hostnames=("v6.test",))
    assert root.find("host/address").get("addr") == "::1"  # type: ignore[union-attr]
    assert script_ids(port(root, "tcp", 80)) == ["banner", "http-server-header", "ssl-cert"]
    assert root.find("host/hostnames/hostname").get("name") == "v6.test"  # type: ignore[union-attr]


def test_synthetic_phase2_scripts_hostscript_and_trace_all_kept(tmp_path: Path) -> None:
    ports = xmlgen.open_tcp(range(1, 41))
    p1 = xmlgen.phase1(tmp_path / "p1.xml", TARGET, [*ports, ("tcp", 41, "closed")], extraports=("closed", 9))
    p2 = xmlgen.phase2(tmp_path / "p2.xml", TARGET, ports)
    root = merged(tmp_path, p1, p2)
    host = root.find("host")
    assert host is not None
    assert [child.tag for child in host][4:] == [*HOST_TAIL_ORDER, "trace", "times"]
    assert [s.get("id") for s in host.findall("hostscript/script")] == ["clock-skew", "host-note"]
    assert [e.get("key") for e in host.findall("hostscript/script[@id='host-note']/elem")] == ["1", "2"]
    assert len(host.findall("ports/port")) == 41
    for portid in range(1, 41):
        assert script_ids(port(root, "tcp", portid)) == ["banner", "http-server-header", "ssl-cert"]
    assert port(root, "tcp", 1).find("script[@id='banner']").get("output") == "<hello> & 1"  # type: ignore[union-attr]
    assert port(root, "tcp", 41).find("service").get("method") == "table"  # type: ignore[union-attr]


def test_phase2_out_of_nmap_order_and_extra_ports_are_still_merged(tmp_path: Path) -> None:
    ports = xmlgen.open_tcp(range(1, 31))
    p1 = xmlgen.phase1(tmp_path / "p1.xml", TARGET, ports)
    p2 = xmlgen.phase2(
        tmp_path / "p2.xml", TARGET, [*reversed(ports), ("tcp", 999, "open"), ("udp", 53, "open")]
    )
    root = merged(tmp_path, p1, p2)
    got = [(p.get("protocol"), int(p.get("portid", "0"))) for p in root.iter("port")]
    assert got == [*(("tcp", n) for n in range(1, 31)), ("tcp", 999), ("udp", 53)]
    assert all(p.find("service").get("method") == "probed" for p in root.iter("port"))  # type: ignore[union-attr]


def test_taskprogress_dropped_and_other_hosts_kept(tmp_path: Path) -> None:
    text = fixture("phase1.xml").read_text()
    host = text[text.index("<host ") : text.index("<runstats>")]
    two = tmp_path / "two.xml"
    two.write_text(
        text.replace(
            "<host ", '<taskprogress task="SYN Stealth Scan" time="1" percent="5.00"/>\n<host ', 1
        ).replace("<runstats>", host.replace("127.0.0.21", "127.0.0.22") + "<runstats>")
    )
    root = merged(tmp_path, two, fixture("phase2.xml"))
    hosts = root.findall("host")
    assert [h.find("address").get("addr") for h in hosts] == [TARGET, "127.0.0.22"]  # type: ignore[union-attr]
    assert hosts[0].find("ports/port/service").get("product") == "OpenSSH"  # type: ignore[union-attr]
    assert hosts[1].find("ports/port[@portid='12222']/service") is None  # as phase 1 had it
    assert hosts[1].find("ports/port[@portid='18080']/service").get("method") == "table"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------------
# all 65,535 ports open in both phases (correctness only; bench/parse.py measures time and memory)


def test_all_65535_ports(tmp_path: Path) -> None:
    p1, p2 = xmlgen.all_ports_pair(tmp_path, TARGET)
    assert len(ports_of(p1, TARGET)) == 65535
    out = tmp_path / "merged.xml"
    merge_reports(p1, p2, out, target_ip=TARGET, hostnames=("all.test",))
    rows = summary(out)
    assert [row.portid for row in rows] == list(range(1, 65536))
    assert all(row.product == f"Product{row.portid % 97}" for row in rows)
    # Stream the output too (a tree of it would be hundreds of MB): every port kept its three scripts
    # with keyed elems, and the host its phase-2 extras.
    scripts = keyless = 0
    host_tags: list[str] = []
    for _, elem in ET.iterparse(out):  # noqa: S314 - our own test output
        if elem.tag == "port":
            scripts += len(elem.findall("script"))
            keyless += sum(1 for e in elem.iter("elem") if "key" not in e.attrib)
            elem.clear()
        elif elem.tag == "host":
            host_tags = [child.tag for child in elem]
    assert scripts == 3 * 65535
    assert keyless == 0
    assert host_tags[-9:] == [*HOST_TAIL_ORDER, "trace", "times"]


def test_merge_memory_does_not_grow_with_the_port_count(tmp_path: Path) -> None:
    """Allocation peak, not time: holding all of phase 2's ports (or a tree) would cost about 6.5 MB here."""
    p1, p2 = xmlgen.all_ports_pair(tmp_path, TARGET, 8000)
    tracemalloc.start()
    try:
        merge_reports(p1, p2, tmp_path / "merged.xml", target_ip=TARGET, hostnames=())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 2**20
    assert len(summary(tmp_path / "merged.xml")) == 8000


# ---------------------------------------------------------------------------------------------------------
# hand-made variants (tests/fixtures/nmap/handmade)


def test_handmade_ipv6_pair_keeps_scripts_hostscript_trace_and_ptr(tmp_path: Path) -> None:
    p1, p2 = fixture("handmade/ipv6-phase1.xml"), fixture("handmade/ipv6-phase2.xml")
    assert ports_of(p1, "0:0:0:0:0:0:0:1") == [("tcp", 22), ("tcp", 80)]
    root = merged(tmp_path, p1, p2, target="0:0:0:0:0:0:0:1", hostnames=("v6.test", "LOCALHOST"))
    host = root.find("host")
    assert host is not None
    assert [h.attrib for h in host.findall("hostnames/hostname")] == [
        {"name": "localhost", "type": "PTR"},
        {"name": "v6.test", "type": "user"},
    ]
    assert script_ids(port(root, "tcp", 22)) == ["ssh-hostkey", "banner"]
    assert len(port(root, "tcp", 22).findall("script/table")) == 2
    assert script_ids(port(root, "tcp", 80)) == ["http-server-header", "http-title", "http-methods"]
    methods = port(root, "tcp", 80).findall("script[@id='http-methods']/table/elem")
    assert [(e.get("key"), e.text) for e in methods] == [("1", "GET"), ("2", "HEAD")]
    assert port(root, "tcp", 443).find("state").get("state") == "closed"  # type: ignore[union-attr]
    assert [s.get("id") for s in host.findall("hostscript/script")] == ["address-info", "fcrdns"]
    assert host.find("hostscript/script[@id='fcrdns']/elem").get("key") == "1"  # type: ignore[union-attr]
    assert host.find("trace/hop").get("host") == "localhost"  # type: ignore[union-attr]
    assert [child.tag for child in host][-3:] == ["hostscript", "trace", "times"]

    out = (tmp_path / "merged.xml").read_bytes()
    result, raw2 = python_nmap(out)["::1"], python_nmap(p2.read_bytes())["::1"]
    for portid in (22, 80):
        assert result["tcp"][portid]["script"] == raw2["tcp"][portid]["script"]
        assert result["tcp"][portid]["product"] == raw2["tcp"][portid]["product"]
    assert result["hostscript"] == raw2["hostscript"]


def test_handmade_phase2_cut_inside_os_is_treated_as_absent(tmp_path: Path) -> None:
    cut = fixture("handmade/phase2-os-truncated.xml")
    merge_reports(fixture("phase1.xml"), None, tmp_path / "none.xml", target_ip=TARGET, hostnames=())
    root = merged(tmp_path, fixture("phase1.xml"), cut)
    assert (tmp_path / "merged.xml").read_bytes() == (tmp_path / "none.xml").read_bytes()
    assert root.find("host/os") is None


def test_lan_host_with_a_mac_address_keeps_phase2_and_task_hostnames(tmp_path: Path) -> None:
    # A LAN host has a MAC <address> after its IP one, and iterparse has usually parsed both by the first
    # one's end event: a merge that counted <address> children there would drop every LAN host's phase 2.
    lan = "10.250.176.2"
    out = tmp_path / "out.xml"
    merge_reports(
        fixture("lan-phase1.xml"), fixture("lan-phase2.xml"), out, target_ip=lan, hostnames=["svc.test"]
    )
    root = ET.parse(out).getroot()  # noqa: S314 - our own test output
    host = root.find("host")
    assert script_ids(port(root, "tcp", 80)) == ["http-server-header", "http-title"]
    assert port(root, "tcp", 22).find("service").get("product") == "OpenSSH"
    assert [h.get("name") for h in host.iter("hostname")] == ["svc.test"]
    assert check_report(out.read_bytes()) == [lan]
