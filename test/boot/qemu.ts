/**
 * Boots a QEMU x86 guest from the network and returns its serial console. The guest's
 * network reaches one thing only: the test's HTTP server on the host's 127.0.0.1. Each run
 * ends with the guest, at a console line the caller waits for, or at a hard timeout.
 */
import { BUSYBOX } from "./requirements.ts";

/** The boot server as the guest sees it. */
export const GUEST_SERVER = "10.0.2.100";

export interface QemuBoot {
  /** The serial console, carriage returns removed. */
  console: string;
  /** QEMU's exit code; null when it was stopped. */
  code: number | null;
  /** Whether the console matched `until` and QEMU was stopped there. */
  matched: boolean;
  timedOut: boolean;
  seconds: number;
}

export interface QemuOptions {
  /** Debian's iPXE ROM on the NIC (`-boot n`), or an ipxe.lkrn booted with -kernel. */
  firmware: "debian-rom" | { lkrn: string };
  /** DHCP's boot file name: a path on the HTTP server. */
  bootfile: string;
  /** The host port of the HTTP server on 127.0.0.1. */
  serverPort: number;
  /** Stop the guest as soon as the console matches. */
  until?: RegExp;
  timeoutMs?: number;
}

export async function bootQemu(options: QemuOptions): Promise<QemuBoot> {
  const started = performance.now();
  // restrict=on cuts the guest off from the host and the outside world (no DNS, no
  // 10.0.2.2); the one forwarded address is carried to 127.0.0.1 by a process per
  // connection. Without it a refused chain would send iPXE looking for certificates online.
  const netdev = [
    "user",
    "id=n0",
    "restrict=on",
    `guestfwd=tcp:${GUEST_SERVER}:80-cmd:${BUSYBOX} nc 127.0.0.1 ${options.serverPort}`,
    `bootfile=http://${GUEST_SERVER}${options.bootfile}`,
  ].join(",");
  const firmware = options.firmware === "debian-rom"
    ? ["-boot", "n", "-device", "virtio-net-pci,netdev=n0"]
    : ["-kernel", options.firmware.lkrn, "-device", "virtio-net-pci,netdev=n0,romfile="];
  // No -enable-kvm: under KVM on these machines QEMU exits right after iPXE's banner.
  // Emulation keeps a core busy; at a lower priority it leaves the timing-sensitive tests
  // that run beside it their share (nice execs QEMU, so killing the child kills QEMU).
  const qemu = ["qemu-system-x86_64", "-m", "512", "-nographic", "-no-reboot"];
  const child = new Deno.Command("nice", {
    args: ["-n", "10", ...qemu, "-netdev", netdev, ...firmware],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();

  let console = "";
  let matched = false;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill("SIGKILL");
  }, options.timeoutMs ?? 120_000);
  const stderr = new Response(child.stderr).text();
  const decoder = new TextDecoder();
  for await (const chunk of child.stdout) {
    console += decoder.decode(chunk, { stream: true }).replaceAll("\r", "");
    if (!matched && options.until?.test(console)) {
      matched = true;
      child.kill("SIGKILL");
    }
  }
  const status = await child.status;
  clearTimeout(timer);
  const problems = (await stderr).trim();
  return {
    console: problems ? `${console}\n[qemu stderr] ${problems}` : console,
    code: matched || timedOut ? null : status.code,
    matched,
    timedOut,
    seconds: (performance.now() - started) / 1000,
  };
}
