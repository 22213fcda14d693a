using System.Diagnostics;

namespace UblkSharp.VmTests;

/// <summary>
/// `ublksharp upgrade`: a new daemon takes a live device over while fio writes and verifies at
/// depth 32 and a prober times every 4 KiB read. No fio error and no failed read may happen, and
/// the device node and its major:minor never change. The stall (the longest time without a read
/// completing, from the command's start) is reported as FIGURE lines. On 6.12 the hand-over goes
/// through USER_RECOVERY_REISSUE; on 7.3 through QUIESCE_DEV, with recovery on. A supervised device
/// gets a new supervisor with its new daemon. On loop and cow: a cow overlay's daemon writes its
/// bitmap out before it lets go, and the overlay reads back the same after a clean reopen; a cow
/// device whose daemon was killed is not recovered (it would lose writes) but is an orphan that del
/// removes. mem keeps its data in the daemon's memory: it cannot have recovery, and upgrade refuses it.
/// </summary>
[Trait("kernel", "7.3")]
public class UpgradeTests
{
    private const string Image = "/tmp/ublksharp-upgrade.img";
    private const string Overlay = "/tmp/ublksharp-upgrade.cow";
    private const long ProbeSpan = 64 << 20;

    // Upgrades under load, for a median and a max over 10 (each about 2 s in the guest: the CLI is native).
    private const int Upgrades = 10;

    // What an upgrade that loses to a recover may say: no daemon serves the device yet (use recover),
    // the takeover is in progress, or the recover's daemon has not written its record yet.
    private static readonly string[] UpgradeBesideRecoverReasons = ["recover", "in progress", "record names daemon"];

    private static string RecoveryMode => VmEnvironment.Is612 ? "reissue" : "on";

    [Theory]
    [InlineData("loop")]
    [InlineData("cow")]
    // Batched IO where the kernel has it (7.0+): handed over by the old daemon exiting, not by
    // QUIESCE_DEV (which fails a batched device's requests), so with recovery reissue.
    [InlineData("loop-batch")]
    public async Task UpgradesUnderFioVerifyFailNoIoAndKeepTheDevice(string kind)
    {
        VmEnvironment.RequireDriver();
        var batch = kind == "loop-batch";
        Lifecycle.CreateImage(Image, 256 << 20);
        File.Delete(Overlay);
        try
        {
            if (batch && !ZeroCopyTests.BatchOffered)
            {
                // 6.12: the case is the plain loop one; what is left to check is the refusal.
                Lifecycle.AssertRefused($"add -t loop -f {Image} --recovery reissue --batch on", "BATCH_IO");
                return;
            }
            var target = kind == "cow" ? $"-t cow -f {Overlay}" : $"-t loop -f {Image}";
            // The batched one on the ring, so zero copy too: the new daemon's queues register their
            // buffer tables again, and the requests requeued for it find them.
            var recovery = batch ? "reissue --batch on --io ring" : RecoveryMode;
            var dev = CliDevices.Add($"{target}{(kind == "cow" ? $" --create --backing {Image}" : "")} -q 2 -d 64 --recovery {recovery}");
            var id = CliDevices.IdOf(dev);
            Assert.Equal(batch, CliDevices.List()[id].GetProperty("batch").GetBoolean());
            Assert.True(!batch || CliDevices.List()[id].GetProperty("data").GetString() == "zero-copy", "the batched device is not zero copy");
            var rdev = DeviceNumber(dev);
            using var prober = new IoProber(dev, ProbeSpan);
            Assert.True(Lifecycle.PollFor(() => prober.Completions > 20, TimeSpan.FromSeconds(60)), $"the prober made no progress: {string.Join("; ", prober.Errors)}");
            // Verify runs one after another until the upgrades are done, each at a bounded rate: an
            // unthrottled fio leaves a TCG guest no CPU to start the new daemons with.
            var upgrading = true;
            var fio = Task.Run(() =>
            {
                var runs = new List<FioResult>();
                do
                {
                    runs.Add(Fio.Run(dev, TimeSpan.FromMinutes(5), "--rw=randwrite", "--bsrange=4k-128k", "--verify=crc32c", "--do_verify=1",
                        "--verify_state_save=0", "--size=8M", "--offset_increment=8M", "--rate_iops=100", $"--randseed={runs.Count + 1}"));
                }
                while (Volatile.Read(ref upgrading) && runs[^1].ExitCode == 0);
                return runs;
            }, TestContext.Current.CancellationToken);
            var stalls = new List<double>();
            var commands = new List<double>();
            for (var u = 0; u < Upgrades; u++)
            {
                var pid = CliDevices.DaemonPid(id);
                var start = Stopwatch.GetTimestamp();
                var (code, output) = VmEnvironment.RunCli($"upgrade -n {id}", TimeSpan.FromMinutes(4));
                commands.Add(Stopwatch.GetElapsedTime(start).TotalSeconds);
                Assert.True(code == 0, $"upgrade {u} exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
                VmEnvironment.Log($"upgrade {u}: {output.Trim()}");
                var newPid = CliDevices.DaemonPid(id);
                Assert.NotEqual(pid, newPid);
                Assert.True(Lifecycle.PollFor(() => !Running(pid), TimeSpan.FromSeconds(10)), $"upgrade {u}: the old daemon {pid} still runs");
                Assert.Equal(rdev, DeviceNumber(dev));
                var after = Stopwatch.GetTimestamp();
                Assert.True(Lifecycle.PollFor(() => prober.CompletionsAfter(after) > 0, TimeSpan.FromSeconds(60)), $"upgrade {u}: no read completed after it");
                stalls.Add(prober.StallAfter(start).TotalSeconds);
            }
            Volatile.Write(ref upgrading, false);
            var runs = await fio;
            foreach (var run in runs)
            {
                Fio.AssertVerified(run);
            }
            Assert.Empty(prober.Errors);
            Assert.True(prober.Stop(TimeSpan.FromSeconds(30)), "the prober's read did not come back");
            stalls.Sort();
            if (kind == "cow")
            {
                // What the last daemon serves is what its overlay holds once closed and opened again:
                // no hand-over left a bit unwritten.
                var served = VmEnvironment.ShOk($"sha256sum < {dev}").Trim();
                CliDevices.Del(id);
                var again = CliDevices.Add($"{target} --read-only");
                id = CliDevices.IdOf(again);
                Assert.Equal(served, VmEnvironment.ShOk($"sha256sum < {again}").Trim());
            }
            VmEnvironment.Figure($"UPGRADE {kind} on {VmEnvironment.KernelRelease} (recovery {recovery}): {Upgrades} upgrades under fio verify: IO stall median {Lifecycle.Seconds(Lifecycle.Median(stalls))}, max {Lifecycle.Seconds(stalls[^1])}; " +
                $"the command took median {Lifecycle.Seconds(Lifecycle.Median(commands))}; {runs.Count} fio verify runs, the last: {runs[^1].Summary}");
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
            File.Delete(Overlay);
        }
    }

    /// <summary>
    /// A cow device with recovery whose daemon is killed: its latest bitmap bits died with it, so
    /// recover refuses it (a recovered device would lose writes its file system counts as done),
    /// list calls it an orphan with that reason, and del removes it. Supervising a cow device is
    /// refused for the same reason.
    /// </summary>
    [Fact]
    public void ACowDeviceWhoseDaemonWasKilledIsNotRecoveredButDeleted()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        File.Delete(Overlay);
        try
        {
            Lifecycle.AssertRefused($"add -t cow -f {Overlay} --create --backing {Image} --recovery {RecoveryMode} --supervise", "--supervise", "upgrade");
            Assert.False(File.Exists(Overlay), "a refused add left a COW file behind");
            var dev = CliDevices.Add($"-t cow -f {Overlay} --create --backing {Image} --recovery {RecoveryMode}");
            var id = CliDevices.IdOf(dev);
            VmEnvironment.ShOk($"dd if=/dev/urandom of={dev} bs=64k count=16 oflag=direct status=none");
            var daemon = CliDevices.DaemonPid(id);
            Lifecycle.Kill9(daemon);
            Assert.True(Lifecycle.PollFor(() => !Running(daemon), TimeSpan.FromSeconds(10)), $"the killed daemon {daemon} still runs");
            Lifecycle.AssertRefused($"recover -n {id}", "would lose writes", $"del -n {id}");
            var table = VmEnvironment.RunCli("list", TimeSpan.FromMinutes(1)).Output;
            Assert.Contains($"device {id} is an orphan", table, StringComparison.Ordinal);
            Assert.Contains("would lose writes", table, StringComparison.Ordinal);
            CliDevices.Del(id);
            Assert.False(File.Exists($"/dev/ublkb{id}"), $"/dev/ublkb{id} outlived del");
            // The overlay itself is whole up to its last write-back, and opens again.
            var again = CliDevices.Add($"-t cow -f {Overlay} --read-only");
            VmEnvironment.ShOk($"dd if={again} of=/dev/null bs=1M iflag=direct status=none");
            CliDevices.Del(CliDevices.IdOf(again));
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
            File.Delete(Overlay);
        }
    }

    /// <summary>
    /// The refusals and failures, each leaving the old daemon serving: a new build that cannot start,
    /// two upgrades at once, an upgrade during a recover, a device without recovery, a device with
    /// recovery on where the kernel has no QUIESCE_DEV.
    /// </summary>
    [Fact]
    public async Task AFailedOrRefusedUpgradeLeavesTheOldDaemonServing()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        const string bad = "/tmp/ublksharp-bad-build";
        try
        {
            File.WriteAllText(bad, "#!/bin/sh\necho 'this build is broken' >&2\nexit 3\n");
            VmEnvironment.ShOk($"chmod 0700 {bad}");
            var dev = CliDevices.Add($"-t loop -f {Image} --recovery {RecoveryMode}");
            var id = CliDevices.IdOf(dev);
            var pid = CliDevices.DaemonPid(id);
            Lifecycle.AssertRefused($"upgrade -n {id} --binary {bad}", "new daemon", "old daemon keeps serving", "this build is broken");
            Assert.Equal(pid, CliDevices.DaemonPid(id));
            VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none");
            Lifecycle.AssertRefused($"upgrade -n {id} --binary /tmp/no-such-build", "no such file");
            // Two upgrades at once: one takes the device over, the other fails before changing anything.
            var results = await Task.WhenAll(Enumerable.Range(0, 2).Select(_ => Task.Run(() => VmEnvironment.RunCli($"upgrade -n {id}", TimeSpan.FromMinutes(4)), TestContext.Current.CancellationToken)));
            VmEnvironment.Log($"two upgrades at once: exits {results[0].ExitCode} and {results[1].ExitCode}:\n{results[0].Output}\n{results[1].Output}");
            Assert.Single(results, x => x.ExitCode == 0);
            var loser = results.Single(x => x.ExitCode != 0).Output;
            Assert.Contains("in progress", loser, StringComparison.Ordinal);
            Assert.DoesNotContain("   at ", loser, StringComparison.Ordinal);
            Assert.NotEqual(pid, CliDevices.DaemonPid(id));
            VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none");
            // An upgrade during a recover (about 2 s here), started with it and into it: the recover
            // takes the device over; the upgrade is refused with the reason, or (started late)
            // upgrades the recovered daemon. Never both half way, never a stack trace.
            foreach (var delay in new[] { 0, 400, 1000 })
            {
                var dead = CliDevices.DaemonPid(id);
                Lifecycle.Kill9(dead);
                var recover = Task.Run(() => VmEnvironment.RunCli($"recover -n {id}", TimeSpan.FromMinutes(2)), TestContext.Current.CancellationToken);
                await Task.Delay(delay, TestContext.Current.CancellationToken);
                var upgrade = VmEnvironment.RunCli($"upgrade -n {id}", TimeSpan.FromMinutes(4));
                var recovered = await recover;
                VmEnvironment.Figure($"upgrade {delay} ms into a recover on {VmEnvironment.KernelRelease}: " +
                    (upgrade.ExitCode == 0 ? "it upgraded the recovered daemon" : $"refused: {upgrade.Output.Trim().Split('\n')[0]}") + $"; the recover exited {recovered.ExitCode}");
                Assert.True(recovered.ExitCode == 0, $"the recover failed beside an upgrade:\n{recovered.Output}\n{CliDevices.DaemonLogs()}");
                Assert.DoesNotContain("   at ", upgrade.Output, StringComparison.Ordinal);
                if (upgrade.ExitCode != 0)
                {
                    Assert.True(UpgradeBesideRecoverReasons.Any(f => upgrade.Output.Contains(f, StringComparison.Ordinal)), $"the upgrade failed without saying why:\n{upgrade.Output}");
                }
                var serving = Lifecycle.WaitForNewDaemon(id, dead, TimeSpan.FromSeconds(30));
                Assert.True(Lifecycle.PollFor(() => Runtime.DeviceRecord.Load(id)?.Pid == serving, TimeSpan.FromSeconds(10)), $"the record does not name the serving daemon {serving}");
                VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none");
            }
            CliDevices.Del(id);

            var plain = CliDevices.Add("-t null --size 64M");
            Lifecycle.AssertRefused($"upgrade -n {CliDevices.IdOf(plain)}", "without recovery");
            CliDevices.Del(CliDevices.IdOf(plain));
            if (VmEnvironment.Is612)
            {
                var on = CliDevices.Add("-t null --size 64M --recovery on");
                Lifecycle.AssertRefused($"upgrade -n {CliDevices.IdOf(on)}", "QUIESCE_DEV", "reissue");
                CliDevices.Del(CliDevices.IdOf(on));
            }
            Lifecycle.AssertRefused("upgrade -n 999", "no ublk device 999");
            // A mem device cannot have recovery, but the refusal says why it matters.
            var mem = CliDevices.Add("-t mem --size 16M");
            Lifecycle.AssertRefused($"upgrade -n {CliDevices.IdOf(mem)}", "mem target", "lose data");
            CliDevices.Del(CliDevices.IdOf(mem));
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
            File.Delete(bad);
        }
    }

    /// <summary>
    /// A supervised device: the upgrade gives it a new supervisor (whose first daemon is the new
    /// one), the old supervisor and its spare end, and the new supervisor recovers the device when
    /// its daemon is killed; del then leaves no process behind.
    /// </summary>
    [Fact]
    public void ASupervisedDeviceIsUpgradedWithItsSupervisor()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} --recovery {RecoveryMode} --supervise");
            var id = CliDevices.IdOf(dev);
            var daemon = CliDevices.DaemonPid(id);
            var supervisor = Runtime.DeviceRecord.Load(id)!.SupervisorPid;
            Assert.True(supervisor > 0 && Running(supervisor), $"no supervisor in the record of device {id}");
            var rdev = DeviceNumber(dev);
            var (code, output) = VmEnvironment.RunCli($"upgrade -n {id}", TimeSpan.FromMinutes(4));
            Assert.True(code == 0, $"upgrade exited {code}:\n{output}\n{CliDevices.DaemonLogs()}");
            VmEnvironment.Log($"supervised upgrade: {output.Trim()}");
            var upgraded = CliDevices.DaemonPid(id);
            Assert.NotEqual(daemon, upgraded);
            var record = Runtime.DeviceRecord.Load(id)!;
            Assert.Equal(upgraded, record.Pid);
            Assert.True(record.SupervisorPid > 0 && record.SupervisorPid != supervisor && Running(record.SupervisorPid),
                $"the record names supervisor {record.SupervisorPid}, not a new live one (the old was {supervisor})");
            Assert.True(Lifecycle.PollFor(() => !Running(supervisor) && !Running(daemon), TimeSpan.FromSeconds(20)),
                $"the old supervisor {supervisor} or daemon {daemon} still runs");
            Assert.Equal(rdev, DeviceNumber(dev));
            VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none");
            // The new supervisor supervises: a killed daemon is recovered without a command.
            Lifecycle.Kill9(upgraded);
            var recovered = Lifecycle.WaitForNewDaemon(id, upgraded, TimeSpan.FromSeconds(60));
            VmEnvironment.ShOk($"dd if={dev} of=/dev/null bs=4k count=16 iflag=direct status=none");
            VmEnvironment.Figure($"supervised upgrade on {VmEnvironment.KernelRelease}: daemon {daemon} -> {upgraded}, supervisor {supervisor} -> {record.SupervisorPid}; after kill -9 the new supervisor recovered it (daemon {recovered})");
            CliDevices.Del(id);
            Assert.True(Lifecycle.PollFor(() => VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(20)),
                $"processes outlived del: {string.Join(", ", VmEnvironment.CliProcesses())}");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    // Alive and not a zombie (an orphan waits for the guest's init to reap it).
    private static bool Running(int pid)
    {
        try
        {
            var stat = File.ReadAllText($"/proc/{pid}/stat");
            return stat[(stat.LastIndexOf(')') + 2)..].StartsWith('Z') is false;
        }
        catch (IOException)
        {
            return false;
        }
    }

    // major:minor, in hex, as stat prints them.
    private static string DeviceNumber(string path)
    {
        var st = VmEnvironment.ShOk($"stat -c '%t:%T' {path}").Trim();
        Assert.Matches("^[0-9a-f]+:[0-9a-f]+$", st);
        return st;
    }
}
