using System.Diagnostics;
using System.Text;
using UblkSharp.Interop;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// Every refusal of recover, add and del says why and changes nothing; and every way a device is
/// torn down (del of a mounted device, del --force, del of a quiesced device, SIGTERM to a daemon
/// under load) ends promptly with the device gone and no IO left hanging.
/// </summary>
public class TeardownTests
{
    private const string Image = "/tmp/ublksharp-teardown.img";
    private const string Mnt = "/tmp/ublksharp-teardown";

    /// <summary>Runs a refusal test body with an image and no device before or after.</summary>
    private static void Refusal(Action body)
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        var devices = VmEnvironment.DeviceIds();
        try
        {
            body();
            Assert.Equal(devices, VmEnvironment.DeviceIds());
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(20)),
                $"CLI processes left behind: {string.Join(' ', VmEnvironment.CliProcesses())}");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>A 64 KiB O_DIRECT write and read-back at <paramref name="offset"/>: the device serves.</summary>
    private static void AssertServes(string dev, long offset)
    {
        var data = new byte[64 << 10];
        new Random((int)offset).NextBytes(data);
        DirectIo.Write(dev, offset, data);
        Assert.Equal(data, DirectIo.Read(dev, offset, data.Length));
    }

    // The two recover refusals below look at a device this process serves with the library: the
    // CLI's checks read only the kernel's view (flags, state, daemon pid), and an add and a del
    // through the CLI would cost two process starts each under TCG.

    [Fact]
    public void RecoverOfALiveDeviceIsRefused() => Refusal(() =>
    {
        using var target = new LoopTarget(Image);
        using var device = UblkDevice.Create(target, new DeviceOptions { Recovery = RecoveryMode.On });
        Lifecycle.AssertRefused($"recover -n {device.Id}", "is live", $"pid {Environment.ProcessId}");
        Assert.Equal(DeviceState.Live, Lifecycle.State(device.Id));
        Assert.Equal(Environment.ProcessId, Lifecycle.DaemonPid(device.Id));
        AssertServes(device.BlockPath, 1 << 20);
    });

    [Fact]
    public void RecoverOfADeviceCreatedWithoutRecoveryIsRefused() => Refusal(() =>
    {
        using var target = new MemoryTarget(64 << 20);
        using var device = UblkDevice.Create(target, new DeviceOptions());
        Lifecycle.AssertRefused($"recover -n {device.Id}", "without recovery");
        Assert.Equal(DeviceState.Live, Lifecycle.State(device.Id));
        AssertServes(device.BlockPath, 1 << 20);
    });

    [Fact]
    public void RecoverOfAnUnknownDeviceIsRefused() => Refusal(() => Lifecycle.AssertRefused("recover -n 4093", "no ublk device 4093"));

    [Fact]
    public void FailIoRecoveryIsRefusedOn612() => Refusal(() =>
    {
        Assert.True(VmEnvironment.Is612, $"this test is about Linux 6.12, which lacks USER_RECOVERY_FAIL_IO; the kernel is {VmEnvironment.KernelRelease}");
        Lifecycle.AssertRefused($"add -t loop -f {Image} --recovery fail-io", "does not offer", "FAIL_IO", "6.13");
    });

    [Fact]
    public void MemTargetWithRecoveryIsRefused() => Refusal(() => Lifecycle.AssertRefused("add -t mem --size 64M --recovery on", "mem", "--recovery"));

    [Fact]
    public void SuperviseWithoutRecoveryIsRefused() => Refusal(() => Lifecycle.AssertRefused($"add -t loop -f {Image} --supervise", "--supervise", "--recovery"));

    [Fact]
    [Trait("kernel", "7.3")]
    public void DelOfAMountedDeviceIsRefusedAndTheDeviceKeepsWorking()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev}");
            Lifecycle.Mount(dev, Mnt);
            Lifecycle.AssertRefused($"del -n {id}", "busy");
            Assert.Equal(pid, Lifecycle.DaemonPid(id));
            Assert.Equal(DeviceState.Live, Lifecycle.State(id));
            // The file system still works, through the device and back.
            var data = new byte[1 << 20];
            new Random(7).NextBytes(data);
            File.WriteAllBytes(Path.Combine(Mnt, "after-refusal.bin"), data);
            VmEnvironment.ShOk("sync && echo 3 > /proc/sys/vm/drop_caches");
            Assert.Equal(data, File.ReadAllBytes(Path.Combine(Mnt, "after-refusal.bin")));
            Lifecycle.Umount(Mnt);
            CliDevices.Del(id);
            Assert.False(Processes.IsAlive(pid), $"the daemon (pid {pid}) outlived del");
        }
        finally
        {
            Lifecycle.CleanUp(Mnt);
            File.Delete(Image);
        }
    }

    [Fact]
    [Trait("kernel", "7.3")]
    public void ForcedDelOfAMountedDeviceFailsItsIoAndFreesTheIdAfterUmount()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            VmEnvironment.ShOk($"mkfs.ext4 -q -F {dev}");
            Lifecycle.Mount(dev, Mnt);
            VmEnvironment.ShOk($"dd if=/dev/urandom of={Mnt}/before bs=64k count=16 conv=fsync status=none");

            var sw = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.RunCli($"del -n {id} --force", TimeSpan.FromMinutes(2));
            var delTime = sw.Elapsed;
            Assert.True(code == 0, $"del --force exited {code}:\n{output}");
            Assert.True(delTime < TimeSpan.FromSeconds(30), $"del --force of a mounted device took {Lifecycle.Seconds(delTime)}");
            Assert.True(VmEnvironment.WaitFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(10)), $"the daemon (pid {pid}) outlived del --force");

            // IO on the mount now fails, promptly, with EIO.
            sw.Restart();
            var (writeCode, writeOutput) = VmEnvironment.Sh($"dd if=/dev/zero of={Mnt}/after bs=64k count=16 oflag=direct conv=fsync", TimeSpan.FromMinutes(1));
            var (readCode, readOutput) = VmEnvironment.Sh($"dd if={Mnt}/before of=/dev/null bs=64k iflag=direct", TimeSpan.FromMinutes(1));
            var ioTime = sw.Elapsed;
            VmEnvironment.Log($"del --force took {Lifecycle.Seconds(delTime)}; then write: exit {writeCode}: {writeOutput.Trim()}; read: exit {readCode}: {readOutput.Trim()} ({Lifecycle.Seconds(ioTime)})");
            Assert.True(writeCode != 0 && writeOutput.Contains("Input/output error", StringComparison.Ordinal), $"a write on the mount of a deleted device did not fail with EIO: exit {writeCode}: {writeOutput}");
            Assert.True(readCode != 0 && readOutput.Contains("Input/output error", StringComparison.Ordinal), $"a read on the mount of a deleted device did not fail with EIO: exit {readCode}: {readOutput}");

            // The file system can be unmounted, and then the id is free again.
            sw.Restart();
            Lifecycle.Umount(Mnt);
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(30)), $"device {id} still exists 30 s after the umount");
            VmEnvironment.Log($"umount took {Lifecycle.Seconds(sw.Elapsed)} with the id freed");
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device record outlived del --force");
            var again = CliDevices.Add($"-t loop -f {Image} -n {id}");
            Assert.Equal($"/dev/ublkb{id}", again);
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp(Mnt);
            File.Delete(Image);
        }
    }

    [Fact]
    public async Task DelOfAQuiescedDeviceFailsItsHeldIoPromptly()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery on");
            var id = CliDevices.IdOf(dev);
            var pid = Lifecycle.DaemonPid(id);
            Lifecycle.Kill9(pid);
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            var held = Task.Run(() => DirectIo.Read(dev, 1 << 20, 4096), TestContext.Current.CancellationToken);
            await Task.Delay(1500, TestContext.Current.CancellationToken);
            Assert.False(held.IsCompleted, $"a read of the quiesced device did not wait: {held.Exception?.InnerException?.Message ?? "it completed"}");

            var sw = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.RunCli($"del -n {id}", TimeSpan.FromMinutes(2));
            var delTime = sw.Elapsed;
            Assert.True(code == 0, $"del of a quiesced device exited {code}:\n{output}");
            Assert.True(delTime < TimeSpan.FromSeconds(30), $"del of a quiesced device took {Lifecycle.Seconds(delTime)}");
            var failure = await Record.ExceptionAsync(() => held.WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken));
            VmEnvironment.Log($"del of the quiesced device took {Lifecycle.Seconds(delTime)}; the held read ended {Lifecycle.Seconds(sw.Elapsed)} after del began: {failure?.Message ?? "it succeeded"}");
            Assert.False(failure is TimeoutException, "the held read still hangs 30 s after del");
            Assert.True(failure is IOException, $"the held read did not fail with an IO error: {failure?.ToString() ?? "it succeeded"}");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)), $"device {id} outlived del");
            Assert.False(File.Exists(dev), $"{dev} outlived del");
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device record outlived del");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task SigtermToTheDaemonUnderFioStopsAndDeletesTheDevice(bool foreground)
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        ForegroundDaemon? child = null;
        try
        {
            string dev;
            int pid;
            if (foreground)
            {
                child = ForegroundDaemon.Start("add", "-t", "loop", "-f", Image, "-q", "2");
                dev = child.BlockPath;
                pid = child.Pid;
                Assert.Equal(pid, Lifecycle.DaemonPid(CliDevices.IdOf(dev)));
            }
            else
            {
                dev = CliDevices.Add($"-t loop -f {Image} -q 2");
                pid = CliDevices.DaemonPid(CliDevices.IdOf(dev)); // from list --json
            }
            var id = CliDevices.IdOf(dev);
            var fio = Task.Run(() => Fio.Run(dev, TimeSpan.FromMinutes(4), "--rw=randwrite", "--bsrange=4k-128k", "--size=32M", "--offset_increment=32M",
                "--time_based", "--runtime=120"), TestContext.Current.CancellationToken);
            var writes = Lifecycle.WaitForWrites(dev, 250, fio, TimeSpan.FromMinutes(2));
            var sw = Stopwatch.StartNew();
            Assert.True(Processes.Signal(pid, Processes.SIGTERM), $"SIGTERM to {pid} failed");
            var exited = foreground ? child!.WaitForExit(TimeSpan.FromSeconds(60)) : Lifecycle.PollFor(() => !Processes.IsAlive(pid), TimeSpan.FromSeconds(60));
            var exitTime = sw.Elapsed;
            Assert.True(exited, $"the daemon (pid {pid}) did not exit within 60 s of SIGTERM\n{child?.Output}{CliDevices.DaemonLogs()}");
            if (child is not null)
            {
                Assert.True(child.ExitCode == 0, $"the daemon exited {child.ExitCode} on SIGTERM:\n{child.Output}");
            }
            var r = await fio.WaitAsync(TimeSpan.FromSeconds(90), TestContext.Current.CancellationToken);
            var fioTime = sw.Elapsed;
            VmEnvironment.Log($"SIGTERM after {writes} writes: the daemon exited in {Lifecycle.Seconds(exitTime)}, fio ended at {Lifecycle.Seconds(fioTime)}: {r.Summary}");
            // fio's IO completed (those in flight drain through the daemon) or failed cleanly once the device was stopped:
            // del_gendisk sets the capacity to 0, so the block layer answers later writes with ENOSPC, or EIO.
            Assert.True(r.Error is 0 or Errno.EIO or Errno.ENXIO or Errno.ENODEV or Errno.ENOSPC, $"fio failed with errno {r.Error}: {r}");
            Assert.True(r.WriteIos >= writes / 2, $"fio counted only {r.WriteIos} writes: {r}");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(30)), $"device {id} outlived its daemon's SIGTERM");
            Assert.False(File.Exists(dev), $"{dev} outlived its daemon's SIGTERM");
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device record outlived the daemon");
            Assert.Empty(VmEnvironment.CliProcesses());
        }
        finally
        {
            child?.Dispose();
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    // Every request of this target waits 2.5 s, so START_DEV, which reads the partition table
    // through the target, takes several seconds (and outlasts a start timeout of 1 s).
    private const string SlowStart = "-t fault --base mem --size 64M --delay 1 --delay-ms 2500";

    [Fact]
    public void AStartThatTimesOutLeavesNoDeviceAndSaysWhy() => Refusal(() =>
    {
        // The timed-out START_DEV made the control handle unusable: the clean-up must not depend on it.
        var output = Lifecycle.AssertRefused($"add {SlowStart} --start-timeout 1", "did not start within 1 s");
        Assert.True(output.Trim().Split('\n').Length == 1, $"expected one line, got:\n{output}");
        Assert.DoesNotContain("Unhandled", output, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", CliDevices.DaemonLogs(), StringComparison.Ordinal);
    });

    [Fact]
    public async Task SigtermWhileTheDeviceStartsDeletesIt()
    {
        VmEnvironment.RequireDriver();
        var devices = VmEnvironment.DeviceIds();
        var psi = new ProcessStartInfo(VmEnvironment.Cli) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in SlowStart.Split(' ').Prepend("add").Append("--foreground"))
        {
            psi.ArgumentList.Add(a);
        }
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        var stderr = p.StandardError.ReadToEndAsync(TestContext.Current.CancellationToken);
        try
        {
            uint id = 0;
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.DeviceIds().Except(devices).ToArray() is [var d] && (id = d) == d, TimeSpan.FromMinutes(2)),
                "the daemon added no device within 2 minutes");
            // ADD_DEV is done and START_DEV is reading the partition table (slowly): the daemon
            // records the device only once the start has returned.
            Assert.False(File.Exists(DeviceRecord.PathFor(id)), "the device started before the test could signal its daemon");
            Assert.True(Processes.Signal(p.Id, Processes.SIGTERM), "SIGTERM failed");
            Assert.True(p.WaitForExit(TimeSpan.FromMinutes(2)), "the daemon did not exit within 2 minutes of SIGTERM");
            var output = await stdout + await stderr;
            VmEnvironment.Log($"SIGTERM during START_DEV: exit {p.ExitCode}: {output.Trim()}");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(30)),
                $"device {id} outlived its daemon, which got SIGTERM while the device started:\n{output}");
            Assert.Equal(0, p.ExitCode);
            Assert.DoesNotContain("   at ", output, StringComparison.Ordinal);
        }
        finally
        {
            if (!p.HasExited)
            {
                p.Kill();
            }
            Lifecycle.CleanUp();
        }
    }

    // This process serves the device, so it is the daemon pid the kernel names; the record written
    // for it names this pid but not this process (another start time, or none), as when a dead
    // daemon's pid has been recycled. del must stop and delete the device and kill nobody.

    [Fact]
    public void DelKillsNoProcessThatTheRecordDoesNotProveToBeTheDaemon()
    {
        VmEnvironment.RequireDriver();
        using var target = new MemoryTarget(64 << 20);
        using var device = UblkDevice.Create(target, new DeviceOptions());
        try
        {
            var self = Environment.ProcessId;
            var started = Processes.StartTime(self);
            Assert.NotNull(started);
            (DeviceRecord.Of(device, "mem", new Dictionary<string, string> { ["size"] = "64M" }, target.Size) with { DaemonStartTime = started + 1 }).Save();
            var sw = Stopwatch.StartNew();
            var (code, output) = VmEnvironment.RunCli($"del -n {device.Id}", TimeSpan.FromMinutes(2));
            VmEnvironment.Log($"del with a record of another process took {Lifecycle.Seconds(sw.Elapsed)}: {output.Trim()}");
            Assert.True(code == 0, $"del exited {code}:\n{output}");
            // Provably not the daemon: del does not even wait for it.
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(25), $"del waited {Lifecycle.Seconds(sw.Elapsed)} for a process that is not the daemon");
            Assert.True(device.WaitForStop(TimeSpan.FromSeconds(30)), "the queues did not end after del");
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(device.Id), TimeSpan.FromSeconds(10)), $"device {device.Id} outlived del");
        }
        finally
        {
            DeviceRecord.Remove(device.Id);
        }
    }

    [Fact]
    public void DelOfADeviceWithAnOldRecordWaitsButKillsNobody()
    {
        VmEnvironment.RequireDriver();
        using var target = new MemoryTarget(64 << 20);
        using var device = UblkDevice.Create(target, new DeviceOptions());
        try
        {
            (DeviceRecord.Of(device, "mem", new Dictionary<string, string> { ["size"] = "64M" }, target.Size) with { DaemonStartTime = null }).Save();
            var (code, output) = VmEnvironment.RunCli($"del -n {device.Id}", TimeSpan.FromMinutes(2));
            VmEnvironment.Log($"del with an old record: {output.Trim()}");
            Assert.True(code == 0, $"del exited {code}:\n{output}");
            Assert.Contains("not killing it", output, StringComparison.Ordinal);
            Assert.Contains("older ublksharp", output, StringComparison.Ordinal);
            Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(device.Id), TimeSpan.FromSeconds(10)), $"device {device.Id} outlived del");
        }
        finally
        {
            DeviceRecord.Remove(device.Id);
        }
    }

    [Fact]
    public void AFailedRecoveryEndsTheQueueThreadsItStarted()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 64 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery on");
            var id = CliDevices.IdOf(dev);
            Lifecycle.Kill9(Lifecycle.DaemonPid(id));
            Lifecycle.WaitForState(id, DeviceState.Quiesced, TimeSpan.FromSeconds(30));
            Assert.Empty(CliDevices.QueueThreadCpu(Environment.ProcessId));
            var options = new DeviceOptions { Queues = 2, Recovery = RecoveryMode.On, StartTimeout = TimeSpan.FromSeconds(30) };
            // Queue 0 is fetching when queue 1 fails to set up. Left running, queue 0's thread would
            // keep its ring, its tags and /dev/ublkcN open for as long as this process lives.
            using (var broken = new SecondQueueFails(Image))
            {
                var e = Assert.ThrowsAny<IOException>(() => UblkDevice.Recover(id, broken, options).Dispose());
                Assert.Contains("queue 1", e.Message, StringComparison.Ordinal);
            }
            Dictionary<string, long> left = [];
            Assert.True(VmEnvironment.WaitFor(() => (left = CliDevices.QueueThreadCpu(Environment.ProcessId)).Count == 0, TimeSpan.FromSeconds(30)),
                $"queue threads still run after the failed recovery: {string.Join(' ', left.Keys)}");
            // A second recovery would need Linux 6.13+: 6.12's START_USER_RECOVERY trips over a queue
            // that never fetched (put_task_struct(NULL)). The device can still be deleted.
            CliDevices.Del(id);
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>A loop target whose second queue cannot set up.</summary>
    private sealed class SecondQueueFails(string path) : BlockTarget
    {
        private readonly LoopTarget _inner = new(path);

        public override long Size => _inner.Size;

        public override string Kind => "loop";

        public override bool SurvivesRestart => true;

        public override int Read(Span<byte> buffer, long offset) => _inner.Read(buffer, offset);

        public override int Write(ReadOnlySpan<byte> data, long offset) => _inner.Write(data, offset);

        public override UringBackend? CreateUringBackend(int queueId)
            => queueId == 1 ? throw new IOException("queue 1 is made to fail") : null;

        protected override void Dispose(bool disposing)
        {
            if (disposing)
            {
                _inner.Dispose();
            }
            base.Dispose(disposing);
        }
    }

    /// <summary>`ublksharp ... --foreground` as a child of the test: the daemon is this child.</summary>
    private sealed class ForegroundDaemon : IDisposable
    {
        private readonly Process _process;
        private readonly StringBuilder _output = new();
        private volatile string _blockPath = "";

        private ForegroundDaemon(Process process) => _process = process;

        public int Pid => _process.Id;

        public int ExitCode => _process.ExitCode;

        public string BlockPath => _blockPath;

        public string Output
        {
            get
            {
                lock (_output)
                {
                    return _output.ToString();
                }
            }
        }

        public static ForegroundDaemon Start(params string[] args)
        {
            var psi = new ProcessStartInfo(VmEnvironment.Cli) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args)
            {
                psi.ArgumentList.Add(a);
            }
            psi.ArgumentList.Add("--foreground");
            var daemon = new ForegroundDaemon(Process.Start(psi)!);
            daemon._process.OutputDataReceived += (_, e) => daemon.Append(e.Data, stdout: true);
            daemon._process.ErrorDataReceived += (_, e) => daemon.Append(e.Data, stdout: false);
            daemon._process.BeginOutputReadLine();
            daemon._process.BeginErrorReadLine();
            var ready = VmEnvironment.WaitFor(() => daemon.BlockPath.Length > 0 || daemon._process.HasExited, TimeSpan.FromMinutes(2));
            if (!ready || daemon.BlockPath.Length == 0)
            {
                var output = daemon.Output;
                daemon.Dispose();
                Assert.Fail($"ublksharp {string.Join(' ', args)} --foreground did not report a device: {output}");
            }
            return daemon;
        }

        private void Append(string? line, bool stdout)
        {
            if (line is null)
            {
                return;
            }
            lock (_output)
            {
                _output.AppendLine(line);
            }
            if (stdout && line.StartsWith("/dev/ublkb", StringComparison.Ordinal) && _blockPath.Length == 0)
            {
                _blockPath = line.Trim();
            }
        }

        public bool WaitForExit(TimeSpan timeout) => _process.WaitForExit(timeout);

        public void Dispose()
        {
            if (!_process.HasExited)
            {
                _process.Kill();
                _process.WaitForExit(TimeSpan.FromSeconds(10));
            }
            _process.Dispose();
        }
    }
}
