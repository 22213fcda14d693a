using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Nbd.Protocol;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// NBD against the real kernel: the kernel's nbd client on our server, the nbd target as a ublk
/// device in front of nbdkit and of our own server, and one daemon serving a target as a ublk
/// device and an NBD export at once. Unix sockets only: the guest has no network.
/// </summary>
public class NbdVmTests
{
    [Fact]
    public void KernelNbdClientGetsAnExt4FileSystemThatChecksClean()
    {
        using var target = new MemoryTarget(256 << 20);
        var socket = $"/tmp/ublksharp-nbd-{Guid.NewGuid():N}"[..30] + ".sock";
        using var server = NbdServer.Start(NbdAddress.Unix(socket), new NbdExport("disk", target));
        var device = FreeNbdDevice();
        var mnt = Directory.CreateTempSubdirectory("ublksharp-nbd-mnt-").FullName;
        try
        {
            // Two connections: the export offers CAN_MULTI_CONN.
            VmEnvironment.ShOk($"nbd-client -u {socket} {device} -N disk -b 4096 -C 2", TimeSpan.FromMinutes(1));
            Assert.True(VmEnvironment.WaitFor(() => SectorsOf(device) == (256 << 20) / 512, TimeSpan.FromSeconds(20)), $"{device} did not take the export's size");
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {device} && e2fsck -f -n {device}", TimeSpan.FromMinutes(5));
            var sums = VmEnvironment.ShOk(
                $"mount {device} {mnt} && head -c 24M /dev/urandom > {mnt}/a && cp {mnt}/a {mnt}/b && mkdir {mnt}/d && " +
                $"for i in $(seq 1 50); do echo $i > {mnt}/d/$i; done && sync && sha256sum {mnt}/a {mnt}/b | cut -c1-64 && umount {mnt}",
                TimeSpan.FromMinutes(5)).Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal(2, sums.Length);
            Assert.Equal(sums[0], sums[1]);
            VmEnvironment.ShOk($"e2fsck -f -n {device}", TimeSpan.FromMinutes(5));
            // Remount and read back through a cold cache.
            VmEnvironment.ShOk($"echo 3 > /proc/sys/vm/drop_caches; mount {device} {mnt} && [ \"$(sha256sum < {mnt}/a | cut -c1-64)\" = {sums[0]} ] && [ $(ls {mnt}/d | wc -l) = 50 ] && umount {mnt}", TimeSpan.FromMinutes(5));
            VmEnvironment.ShOk($"nbd-client -d {device}", TimeSpan.FromMinutes(1));
            Assert.True(VmEnvironment.WaitFor(() => server.ActiveConnections == 0, TimeSpan.FromSeconds(20)), "the kernel's connections did not close");
            Assert.True(server.ConnectionsAccepted >= 2, $"{server.ConnectionsAccepted} connections");
            Assert.Equal(0, server.InternalErrors);
            Assert.Equal(0, server.ProtocolErrors);
        }
        finally
        {
            if (VmEnvironment.IsMounted(mnt))
            {
                VmEnvironment.Sh($"umount -l {mnt}");
            }
            VmEnvironment.Sh($"nbd-client -d {device}");
            Directory.Delete(mnt);
        }
    }

    /// <summary>
    /// The ring backend to nbdkit as a real device, in plain NBD and over TLS-PSK (GnuTLS), where the
    /// queue's SEND/RECV go through the socketpair the TLS relay carries.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    [Trait("kernel", "7.3")]
    public void NbdTargetInFrontOfNbdkitPassesFioVerify(bool psk)
    {
        VmEnvironment.RequireDriver();
        var socket = $"/tmp/ublksharp-kit-{Guid.NewGuid():N}"[..30] + ".sock";
        var keys = socket + ".keys";
        if (psk)
        {
            VmEnvironment.ShOk($"psktool -u alice -p {keys} >/dev/null && chmod 600 {keys}");
        }
        using var nbdkit = psk ? StartNbdkit(socket, "--tls=require", $"--tls-psk={keys}", "memory", "256M") : StartNbdkit(socket, "memory", "256M");
        try
        {
            var dev = CliDevices.Add(psk ? $"-t nbd --uri nbds+unix://alice@/?socket={socket} --tls-psk {keys} -q 2" : $"-t nbd --uri nbd+unix:///?socket={socket} -q 2");
            // Zero copy where the kernel has it, over TLS too: the payloads move between the request's
            // pages and the socket (the relay's end of the socketpair under TLS).
            var data = CliDevices.List()[CliDevices.IdOf(dev)].GetProperty("data").GetString();
            Assert.True(!ControlFeatureTests.Offers(UblkFeatures.AutoBufReg) || data == "zero-copy", $"the nbd device's data path is {data}");
            var r = Fio.Verify(dev, "32M", TimeSpan.FromMinutes(6));
            Assert.True(r.ExitCode == 0 && r.Error == 0, r.ToString());
            Assert.True(r.WriteIos > 0 && r.ReadIos > 0, r.ToString());
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp();
            Stop(nbdkit);
            File.Delete(keys);
        }
    }

    [Fact]
    [Trait("kernel", "7.3")]
    public void NbdTargetInFrontOfOurServerPassesFioVerifyAcrossAServerRestart()
    {
        VmEnvironment.RequireDriver();
        using var memory = new MemoryTarget(256 << 20);
        var socket = $"/tmp/ublksharp-our-{Guid.NewGuid():N}"[..30] + ".sock";
        var server = NbdServer.Start(NbdAddress.Unix(socket), new NbdExport("disk", memory));
        try
        {
            var dev = CliDevices.Add($"-t nbd --uri nbd+unix:///disk?socket={socket} -q 2");
            var r = Fio.Verify(dev, "32M", TimeSpan.FromMinutes(6));
            Assert.True(r.ExitCode == 0 && r.Error == 0, r.ToString());
            // The server goes away for a second in the middle of a verify run: the nbd target
            // reconnects and replays what was in flight, and fio sees no error. The restart waits
            // for this run's IO to reach the server (rather than for a fixed time), and the counts
            // on both servers show that verify IO went to each, so the restart fell inside the run.
            var first = server;
            var baseline = first.RequestsServed;
            const int Before = 200;
            var fioDone = false;
            long servedBefore = -1;
            var fioRanPastRestart = false;
            var restart = new Thread(() =>
            {
                if (!Lifecycle.PollFor(() => Volatile.Read(ref fioDone) || first.RequestsServed - baseline >= Before, TimeSpan.FromMinutes(8)) || Volatile.Read(ref fioDone))
                {
                    return;
                }
                first.Dispose();
                servedBefore = first.RequestsServed - baseline;
                Thread.Sleep(1000);
                server = NbdServer.Start(NbdAddress.Unix(socket), new NbdExport("disk", memory));
                fioRanPastRestart = !Volatile.Read(ref fioDone);
            });
            restart.Start();
            r = Fio.Verify(dev, "48M", TimeSpan.FromMinutes(8));
            Volatile.Write(ref fioDone, true);
            restart.Join();
            var servedAfter = ReferenceEquals(server, first) ? 0 : server.RequestsServed;
            VmEnvironment.Figure($"nbd target across a server restart: {servedBefore} requests served before it, {servedAfter} after; fio: {r.Summary}");
            Assert.True(r.ExitCode == 0 && r.Error == 0, r.ToString());
            Assert.True(servedBefore >= Before, $"the verify run ended before the server had served {Before} of its requests ({first.RequestsServed - baseline}): the restart never happened");
            Assert.True(fioRanPastRestart, "fio finished while the server was down: the restart was not inside the verify run");
            Assert.True(servedAfter > 0, $"the restarted server served no request of the verify run ({server.ConnectionsAccepted} connections)");
            CliDevices.Del(CliDevices.IdOf(dev));
        }
        finally
        {
            CliDevices.CleanUp();
            server.Dispose();
        }
    }

    [Fact]
    [Trait("kernel", "7.3")]
    public void ASilentUpstreamFailsIoAfterTheTimeoutDelWorksAndIoWorksWhenItReturns()
    {
        // The reviewer's case against the real driver: the upstream stops answering without
        // closing (a half-open connection). Before the ring backend, a direct read was still
        // blocked 8 minutes later, and `del` with it.
        VmEnvironment.RequireDriver();
        using var memory = new MemoryTarget(64 << 20);
        var socket = $"/tmp/ublksharp-sil-{Guid.NewGuid():N}"[..30] + ".sock";
        using var server = NbdServer.Start(NbdAddress.Unix(socket), new NbdExport("disk", memory));
        using var proxy = UblkSharp.Tests.Nbd.SilentProxy.ToUnix(socket, socket + ".proxy");
        try
        {
            var dev = CliDevices.Add($"-t nbd --uri \"{proxy.Uri("disk")}\" --timeout 3");
            var pattern = Enumerable.Repeat((byte)0xa5, 4096).ToArray();
            DirectIo.Write(dev, 0, pattern);
            Assert.Equal(pattern, DirectIo.Read(dev, 0, 4096));

            proxy.Forwarding = false;
            var clock = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct", TimeSpan.FromSeconds(90));
            var failedAfter = clock.Elapsed;
            VmEnvironment.Figure($"nbd target, silent upstream, --timeout 3: a direct read failed after {failedAfter.TotalSeconds:0.0} s (dd exit {code})");
            Assert.True(code != 0, $"a read from a silent upstream succeeded:\n{output}");
            Assert.Contains("Input/output error", output, StringComparison.Ordinal);
            Assert.InRange(failedAfter, TimeSpan.FromSeconds(2.5), TimeSpan.FromSeconds(60));

            // The upstream answers again: IO works again on the same device (the first tries may
            // meet a connection made while it was silent, which fails within its own bound).
            proxy.Forwarding = true;
            clock.Restart();
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct", TimeSpan.FromSeconds(60)).ExitCode == 0, TimeSpan.FromSeconds(60)),
                "IO did not work again after the upstream returned");
            VmEnvironment.Figure($"nbd target: IO worked again {clock.Elapsed.TotalSeconds:0.0} s after the upstream returned");
            Assert.Equal(pattern, DirectIo.Read(dev, 0, 4096));

            // Silent again, with a read in flight: `del --force` (plain `del` refuses a device held
            // open, and dd holds it until its read fails) still ends, and the device is gone.
            proxy.Forwarding = false;
            var readerExit = 0;
            var reader = new Thread(() => readerExit = VmEnvironment.Sh($"dd if={dev} of=/dev/null bs=4k count=1 iflag=direct", TimeSpan.FromSeconds(90)).ExitCode);
            reader.Start();
            Thread.Sleep(500);
            clock.Restart();
            var id = CliDevices.IdOf(dev);
            var (delCode, delOutput) = VmEnvironment.RunCli($"del -n {id} --force");
            var inFlight = reader.IsAlive;
            Assert.True(delCode == 0, $"del -n {id} --force exited {delCode}:\n{delOutput}");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)), $"device {id} still exists after del --force");
            VmEnvironment.Figure($"nbd target: del --force with a silent upstream and a read {(inFlight ? "still" : "no longer")} in flight took {clock.Elapsed.TotalSeconds:0.0} s");
            Assert.True(reader.Join(TimeSpan.FromSeconds(60)), "the reader was still blocked after del");
            Assert.NotEqual(0, readerExit);
        }
        finally
        {
            CliDevices.CleanUp();
        }
    }

    [Fact]
    [Trait("kernel", "7.3")]
    public void OneDaemonServesATargetAsUblkAndNbdAtOnce()
    {
        VmEnvironment.RequireDriver();
        var socket = $"/tmp/ublksharp-both-{Guid.NewGuid():N}"[..30] + ".sock";
        var psi = new ProcessStartInfo(VmEnvironment.Cli) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in (string[])["serve", "-t", "mem", "--size", "64M", "--listen", $"unix://{socket}", "--export", "both", "--ublk", "-q", "2"])
        {
            psi.ArgumentList.Add(a);
        }
        using var daemon = Process.Start(psi)!;
        var stderr = new System.Text.StringBuilder();
        daemon.ErrorDataReceived += (_, e) =>
        {
            lock (stderr)
            {
                stderr.AppendLine(e.Data);
            }
        };
        daemon.BeginErrorReadLine();
        try
        {
            Assert.Equal($"unix://{socket}", daemon.StandardOutput.ReadLine());
            var dev = daemon.StandardOutput.ReadLine();
            Assert.True(dev is not null && dev.StartsWith("/dev/ublkb", StringComparison.Ordinal), $"no device path: {dev}");
            Assert.True(File.Exists(dev), $"{dev} does not exist");
            Assert.Contains(CliDevices.IdOf(dev), CliDevices.List().Keys);
            var uri = $"nbd+unix:///both?socket={socket}";
            // Written through the device (O_DIRECT), read over NBD; and the other way round.
            QemuIo($"-n -c 'write -P 0xa5 0 4M' {dev}");
            QemuIo($"-c 'read -P 0xa5 0 4M' '{uri}'");
            QemuIo($"-c 'write -P 0x5a 8M 4M' -c 'write -z 12M 1M' '{uri}'");
            QemuIo($"-n -c 'read -P 0x5a 8M 4M' -c 'read -P 0 12M 1M' {dev}");
            // Both at once: fio verifies through the device while NBD clients read and write elsewhere.
            var nbdLoad = new Thread(() =>
            {
                for (var i = 0; i < 5; i++)
                {
                    QemuIo($"-c 'write -P {i + 1} 40M 8M' -c 'read -P {i + 1} 40M 8M' '{uri}'");
                }
            });
            nbdLoad.Start();
            var r = Fio.Verify(dev, "16M", TimeSpan.FromMinutes(6));
            nbdLoad.Join();
            Assert.True(r.ExitCode == 0 && r.Error == 0, r.ToString());
            // `stats` sees the ublk side of the daemon: fio's reads and writes, both queues.
            var (code, json) = VmEnvironment.RunCli($"stats -n {CliDevices.IdOf(dev)} --json", TimeSpan.FromMinutes(1));
            Assert.True(code == 0, $"stats exited {code}: {json}");
            using (var figures = System.Text.Json.JsonDocument.Parse(json.Trim().Split('\n')[^1]))
            {
                var ops = figures.RootElement.GetProperty("total").GetProperty("ops");
                Assert.True(ops.GetProperty("write").GetProperty("bytes").GetInt64() >= 16 << 20, json);
                Assert.Equal(2, figures.RootElement.GetProperty("queues").GetArrayLength());
            }
            Processes.Signal(daemon.Id, 15);
            Assert.True(daemon.WaitForExit(60_000), "serve did not stop on SIGTERM");
            Assert.Equal(0, daemon.ExitCode);
            Assert.True(VmEnvironment.WaitFor(() => !File.Exists(dev), TimeSpan.FromSeconds(20)), $"{dev} is still there");
            Assert.False(File.Exists(socket));
            Assert.False(File.Exists($"/run/ublksharp/{CliDevices.IdOf(dev)}.stats"), "the stats socket outlived serve");
        }
        finally
        {
            if (!daemon.HasExited)
            {
                daemon.Kill();
                daemon.WaitForExit(10_000);
            }
            lock (stderr)
            {
                VmEnvironment.Log(stderr.ToString());
            }
            CliDevices.CleanUp();
        }
    }

    private static void QemuIo(string args)
    {
        var output = VmEnvironment.ShOk($"qemu-io -f raw {args}", TimeSpan.FromMinutes(3));
        Assert.DoesNotContain("fail", output, StringComparison.OrdinalIgnoreCase);
    }

    private static string FreeNbdDevice()
    {
        for (var i = 0; i < 16; i++)
        {
            if (File.Exists($"/dev/nbd{i}") && !File.Exists($"/sys/block/nbd{i}/pid") && SectorsOf($"/dev/nbd{i}") == 0)
            {
                return $"/dev/nbd{i}";
            }
        }
        Assert.Fail("no free /dev/nbdN (is the nbd module loaded?)");
        return "";
    }

    private static long SectorsOf(string device)
    {
        var path = $"/sys/block/{Path.GetFileName(device)}/size";
        return File.Exists(path) && long.TryParse(File.ReadAllText(path).Trim(), out var n) ? n : -1;
    }

    internal static Process StartNbdkit(string socket, params string[] plugin)
    {
        var psi = new ProcessStartInfo("nbdkit") { RedirectStandardOutput = true, RedirectStandardError = true };
        // nbdkit writes its pid file once it accepts connections (the socket file exists earlier).
        var pidFile = socket + ".pid";
        foreach (var a in (string[])["-f", "--exit-with-parent", "--pidfile", pidFile, "-U", socket, .. plugin])
        {
            psi.ArgumentList.Add(a);
        }
        var p = Process.Start(psi)!;
        if (!VmEnvironment.WaitFor(() => (File.Exists(pidFile) && new FileInfo(pidFile).Length > 0) || p.HasExited, TimeSpan.FromSeconds(60)) || p.HasExited)
        {
            Assert.Fail($"nbdkit did not start: {(p.HasExited ? p.StandardError.ReadToEnd() : "timeout")}");
        }
        return p;
    }

    internal static void Stop(Process p)
    {
        if (!p.HasExited)
        {
            p.Kill();
            p.WaitForExit(10_000);
        }
    }
}
