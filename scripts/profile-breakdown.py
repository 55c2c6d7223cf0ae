#!/usr/bin/env python3
"""Sums a perf profile into where the time goes: crypto, QUIC, HTTP/2, HTTP/1 and hyper, tokio and
task switches, memory copies, allocation, the kernel's network stack, and the rest.

Usage: scripts/profile-breakdown.py PERF.data [...]   (needs perf; prints one table per file)
"""
import re
import subprocess
import sys

# First match wins: (category, pattern over "dso symbol").
CATEGORIES = [
    ("crypto (AES-GCM, header protection)", r"aws_lc|ring::|gcm|aes_"),
    ("memcpy/memmove", r"memmove|memcpy|memset|copy_user|_copy_to_iter|_copy_from_iter|clear_page"),
    ("allocation", r"malloc|_int_free|\bfree\b|cfree|realloc|_int_malloc|shared_v_drop|promotable_|bytes_mut"),
    ("QUIC (quinn)", r"quinn"),
    ("HTTP/2 (h2)", r"\bh2::"),
    ("HTTP/1, hyper", r"hyper"),
    ("TLS record layer (rustls)", r"rustls"),
    ("scheduling: task switches, wakes, futex", r"finish_task_switch|spin_unlock|spin_lock|futex|schedule|"
     r"try_to_wake|select_task|enqueue|dequeue|tokio::runtime|tokio::sync|mpsc|irqentry|syscall_exit|"
     r"entry_SYSCALL|do_syscall|__x64_sys|epoll|ep_poll|native_queued_spin"),
    ("kernel network stack", r"\[kernel\.kallsyms\].*(tcp_|udp|ip_|ipv6|skb|sock|net_|dev_|__ip|napi|"
     r"softirq|loopback|inet|__sys_send|__sys_recv|sendmsg|recvmsg|gro|gso)"),
    ("kernel other", r"\[kernel\.kallsyms\]"),
    ("tunnel and proxy code (warren)", r"warren"),
]


def breakdown(path):
    out = subprocess.run(
        ["perf", "report", "-i", path, "--stdio", "--no-children", "--sort", "dso,symbol"],
        capture_output=True, text=True, check=True,
    ).stdout
    totals = {name: 0.0 for name, _ in CATEGORIES}
    totals["other"] = 0.0
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if not m:
            continue
        pct, rest = float(m.group(1)), m.group(2)
        for name, pattern in CATEGORIES:
            if re.search(pattern, rest):
                totals[name] += pct
                break
        else:
            totals["other"] += pct
    return totals


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for path in sys.argv[1:]:
        print(f"== {path}")
        for name, pct in sorted(breakdown(path).items(), key=lambda kv: -kv[1]):
            if pct >= 0.05:
                print(f"  {pct:5.1f}%  {name}")


if __name__ == "__main__":
    main()
