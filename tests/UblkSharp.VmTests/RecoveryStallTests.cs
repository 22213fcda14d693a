using System.Diagnostics;
using UblkSharp.Runtime;
using UblkSharp.Targets;
using UblkSharp.Ublk;

namespace UblkSharp.VmTests;

/// <summary>
/// How long IO stalls when a daemon dies and the device is recovered (--recovery reissue): a prober
/// reads 4 KiB O_DIRECT blocks one after another and timestamps each completion; the stall is the
/// longest time after the kill -9 in which none completed. Measured for a manual `recover`, for
/// `add --supervise` (automatic: with its warm spare, and cold), and for a recovery by an already
/// running, already warmed-up process (the library's own cost, the floor under the others). The
/// figures go to the test output (lines starting STALL); the bounds only catch a hang. For scale:
/// on the same guest, ublksrv's best stall was 0.50 s and its recover took 0.25 s.
/// </summary>
[Trait("kernel", "7.3")]
public class RecoveryStallTests
{
    private const string Image = "/tmp/ublksharp-stall.img";
    private const long ProbeSpan = 64 << 20;
    // Medians over 10 (the issue's bars); the native CLI makes each kill cost about 2 s.
    private const int Kills = 10;

    // Generous: a recover takes under a second in this TCG guest (the CLI is native), but a loaded
    // host has made process starts ten times slower; the bound is there to fail a hang, not to judge speed.
    private static readonly TimeSpan StallBound = TimeSpan.FromSeconds(90);

    // The supervisor's restart budget (Supervisor.MaxRestarts within its RestartWindow), with a margin.
    private const int SupervisorRestartBudget = 10;
    private static readonly TimeSpan RestartWindow = TimeSpan.FromSeconds(61);

    [Fact]
    public void ManualRecoverStall()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue");
            var id = CliDevices.IdOf(dev);
            using var prober = StartProber(dev);
            var stalls = new List<double>();
            var recovers = new List<double>();
            for (var k = 0; k < Kills; k++)
            {
                var pid = Lifecycle.DaemonPid(id);
                var killed = Stopwatch.GetTimestamp();
                Lifecycle.Kill9(pid);
                recovers.Add(Lifecycle.Recover(id).TotalSeconds);
                var newPid = Lifecycle.WaitForNewDaemon(id, pid, StallBound);
                var stall = AwaitStall(prober, killed, $"manual recover, kill {k}");
                stalls.Add(stall.TotalSeconds);
                VmEnvironment.Log($"manual recover: kill {k} of daemon {pid}: IO stalled {Lifecycle.Seconds(stall)}, the recover command took {Lifecycle.Seconds(recovers[^1])}; new daemon {newPid}");
                Thread.Sleep(500);
            }
            Report("manual recover", prober, stalls, $"; recover command median {Lifecycle.Seconds(Lifecycle.Median(recovers))}, max {Lifecycle.Seconds(recovers.Max())}");
            // The prober holds the device open, and del refuses a device in use.
            Assert.True(prober.Stop(TimeSpan.FromSeconds(30)), "the prober's read did not come back");
            CliDevices.Del(id);
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(20)),
                $"CLI processes outlived del: {string.Join(' ', VmEnvironment.CliProcesses())}");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>
    /// `add --supervise`: the supervisor keeps a warm spare (a started `recover --standby`) and hands
    /// it the device when the daemon dies. Each kill waits until the spare has finished starting,
    /// as it would have long before a real crash; then two kills with the spare killed first, which
    /// the supervisor answers with a cold start.
    /// </summary>
    [Fact]
    public void SupervisedRecoverStall()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue --supervise");
            var id = CliDevices.IdOf(dev);
            using var prober = StartProber(dev);
            var warm = new List<double>();
            var cold = new List<double>();
            var spare = 0;
            var kills = new List<long>();
            for (var k = 0; k < Kills + 2; k++)
            {
                var isCold = k >= Kills;
                var pid = Lifecycle.DaemonPid(id);
                var ready = Lifecycle.WaitForIdleSpare(spare, TimeSpan.FromMinutes(3));
                Assert.True(ready is not null, $"kill {k}: the supervisor has no warm spare 3 minutes after the last takeover; CLI processes: {string.Join(' ', VmEnvironment.CliProcesses())}\n{CliDevices.DaemonLogs()}");
                spare = ready.Value;
                if (isCold)
                {
                    Lifecycle.Kill9(spare);
                }
                // The supervisor gives up after more than 10 restarts within a minute (a daemon that
                // cannot start is not retried forever); kills are that fast now, so they are paced.
                if (kills.Count >= SupervisorRestartBudget)
                {
                    var wait = RestartWindow - Stopwatch.GetElapsedTime(kills[^SupervisorRestartBudget]);
                    if (wait > TimeSpan.Zero)
                    {
                        Thread.Sleep(wait);
                    }
                }
                var killed = Stopwatch.GetTimestamp();
                kills.Add(killed);
                Lifecycle.Kill9(pid);
                var gone = Stopwatch.GetElapsedTime(killed);
                // Watching the state costs the supervisor nothing, and checks the prober's figure.
                var (quiesced, live, newPid) = WatchTakeover(id, pid, killed);
                var stall = AwaitStall(prober, killed, $"add --supervise, kill {k}");
                (isCold ? cold : warm).Add(stall.TotalSeconds);
                VmEnvironment.Log($"add --supervise: kill {k} of daemon {pid} ({(isCold ? "spare killed first: cold start" : $"warm spare {spare}")}): IO stalled {Lifecycle.Seconds(stall)}; " +
                    $"daemon gone at {Lifecycle.Seconds(gone)}, device seen not live at {Lifecycle.Seconds(quiesced)}, live with new daemon {newPid} at {Lifecycle.Seconds(live)}");
            }
            Report("add --supervise (warm spare)", prober, warm, "");
            Report("add --supervise (spare killed: cold start)", prober, cold, "");
            Assert.Empty(prober.Errors);
            Assert.True(prober.Stop(TimeSpan.FromSeconds(30)), "the prober's read did not come back");
            CliDevices.Del(id);
            // The supervisor and its spare end with the daemon.
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(30)),
                $"CLI processes outlived del: {string.Join(' ', VmEnvironment.CliProcesses())}");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>
    /// A daemon that dies during the supervisor's takeover, right as the device goes live again and
    /// before it reports ready, is recovered once more rather than left quiesced with its IO hung.
    /// </summary>
    [Fact]
    public void SupervisorRecoversADaemonKilledDuringTheTakeover()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        var since = DateTime.UtcNow;
        try
        {
            var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue --supervise");
            var id = CliDevices.IdOf(dev);
            using var prober = StartProber(dev);
            var pid = Lifecycle.DaemonPid(id);
            Assert.NotNull(Lifecycle.WaitForIdleSpare(0, TimeSpan.FromMinutes(3)));
            var killed = Stopwatch.GetTimestamp();
            Lifecycle.Kill9(pid);
            // The moment the spare has the device live, before it has said so: kill it too.
            var second = 0;
            Assert.True(Lifecycle.PollFor(() => Lifecycle.Info(id) is { } i && (DeviceState)i.state == DeviceState.Live && (second = i.ublksrv_pid) != pid && second > 0, StallBound),
                $"device {id} was not live again within {StallBound.TotalSeconds} s of the first kill");
            Lifecycle.Kill9(second);
            var third = Lifecycle.WaitForNewDaemon(id, second, StallBound * 2);
            var stall = AwaitStall(prober, killed, "the second kill");
            var logs = Directory.GetFiles(Path.Combine(DeviceRecord.Directory, "logs"))
                .Where(f => File.GetLastWriteTimeUtc(f) >= since).Select(File.ReadAllText).ToArray();
            var inTakeover = logs.Any(l => l.Contains($"recovering device {id} failed", StringComparison.Ordinal));
            VmEnvironment.Log($"daemon {pid} killed, then its successor {second} as the device went live ({(inTakeover ? "inside the takeover: the supervisor saw the recovery fail" : "after it had reported ready")}); " +
                $"daemon {third} serves; IO stalled {Lifecycle.Seconds(stall)} in all");
            Assert.True(prober.Stop(TimeSpan.FromSeconds(30)), "the prober's read did not come back");
            Assert.Empty(prober.Errors);
            CliDevices.Del(id);
            Assert.True(VmEnvironment.WaitFor(() => VmEnvironment.CliProcesses().Length == 0, TimeSpan.FromSeconds(30)),
                $"CLI processes outlived del: {string.Join(' ', VmEnvironment.CliProcesses())}");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }

    /// <summary>Polls the device's state after a kill: when it was first seen not live, and when live with a new daemon.</summary>
    private static (TimeSpan NotLive, TimeSpan Live, int Pid) WatchTakeover(uint id, int oldPid, long killed)
    {
        TimeSpan? notLive = null;
        var deadline = Stopwatch.GetTimestamp() + (long)(StallBound.TotalSeconds * Stopwatch.Frequency);
        while (Stopwatch.GetTimestamp() < deadline)
        {
            var info = Lifecycle.Info(id);
            var now = Stopwatch.GetElapsedTime(killed);
            if (info is { } i && (DeviceState)i.state == DeviceState.Live && i.ublksrv_pid != oldPid && i.ublksrv_pid > 0)
            {
                return (notLive ?? TimeSpan.Zero, now, i.ublksrv_pid);
            }
            if (info is { } j && (DeviceState)j.state != DeviceState.Live)
            {
                notLive ??= now;
            }
            Thread.Sleep(2);
        }
        Assert.Fail($"device {id} was not live with a new daemon within {StallBound.TotalSeconds} s of the kill\n{CliDevices.DaemonLogs()}");
        return default;
    }

    private static IoProber StartProber(string dev)
    {
        var prober = new IoProber(dev, ProbeSpan);
        Assert.True(VmEnvironment.WaitFor(() => prober.Completions >= 100, TimeSpan.FromSeconds(60)),
            $"the prober completed only {prober.Completions} reads: {string.Join("; ", prober.Errors)}");
        return prober;
    }

    /// <summary>Waits until IO flows again after the kill at <paramref name="killed"/> and returns the stall.</summary>
    private static TimeSpan AwaitStall(IoProber prober, long killed, string what)
    {
        Assert.True(Lifecycle.PollFor(() => prober.CompletionsAfter(killed) >= 20, StallBound),
            $"{what}: IO did not flow again within {StallBound.TotalSeconds} s: {string.Join("; ", prober.Errors)}");
        return prober.StallAfter(killed);
    }

    private static void Report(string how, IoProber prober, List<double> stalls, string extra)
    {
        var summary = $"STALL {how}: {stalls.Count} kills, IO stall median {Lifecycle.Seconds(Lifecycle.Median(stalls))}, max {Lifecycle.Seconds(stalls.Max())}, " +
            $"min {Lifecycle.Seconds(stalls.Min())}{extra}; {prober.Completions} reads, {prober.Errors.Length} failed";
        VmEnvironment.Log(summary);
        Console.WriteLine(summary);
        Assert.Empty(prober.Errors);
        Assert.True(stalls.Max() < StallBound.TotalSeconds, $"{how}: an IO stall of {Lifecycle.Seconds(stalls.Max())} exceeds {StallBound.TotalSeconds} s");
    }

    /// <summary>
    /// The floor under both: the daemon is killed and this (already running) process recovers the
    /// device with the library, so no process start is in the stall.
    /// </summary>
    [Fact]
    public void InProcessRecoverStall()
    {
        VmEnvironment.RequireDriver();
        Lifecycle.CreateImage(Image, 128 << 20);
        try
        {
            var stalls = new List<double>();
            for (var k = 0; k < 3; k++)
            {
                var dev = CliDevices.Add($"-t loop -f {Image} -q 2 --recovery reissue");
                var id = CliDevices.IdOf(dev);
                using var prober = new IoProber(dev, ProbeSpan);
                Assert.True(VmEnvironment.WaitFor(() => prober.Completions >= 100, TimeSpan.FromSeconds(30)), $"the prober completed only {prober.Completions} reads");
                var record = DeviceRecord.Load(id);
                Assert.NotNull(record);
                var pid = Lifecycle.DaemonPid(id);
                var killed = Stopwatch.GetTimestamp();
                Lifecycle.Kill9(pid);
                var killedAt = Stopwatch.GetElapsedTime(killed);
                using var target = new LoopTarget(Image);
                Exception? fatal = null;
                var device = UblkDevice.Recover(id, target, new DeviceOptions { Queues = record.Queues, Depth = record.Depth, MaxIoBytes = record.MaxIoBytes, Recovery = RecoveryMode.Reissue },
                    e => fatal = e);
                try
                {
                    var recovered = Stopwatch.GetElapsedTime(killed);
                    Assert.True(Lifecycle.PollFor(() => prober.CompletionsAfter(killed) >= 20, StallBound), "no IO completed after the in-process recovery");
                    var stall = prober.StallAfter(killed);
                    stalls.Add(stall.TotalSeconds);
                    VmEnvironment.Log($"in-process recover {k}: daemon {pid} gone {Lifecycle.Seconds(killedAt)} after kill -9, Recover returned at {Lifecycle.Seconds(recovered)}, IO stalled {Lifecycle.Seconds(stall)}");
                    Assert.True(prober.Stop(TimeSpan.FromSeconds(30)), "the prober's read did not come back");
                    Assert.Empty(prober.Errors);
                }
                finally
                {
                    device.Dispose();
                    DeviceRecord.Remove(id);
                }
                Assert.Null(fatal);
                Assert.True(VmEnvironment.WaitFor(() => !VmEnvironment.DeviceIds().Contains(id), TimeSpan.FromSeconds(10)), $"device {id} outlived Dispose");
            }
            var summary = $"STALL in-process recover: {stalls.Count} kills, IO stall median {Lifecycle.Seconds(Lifecycle.Median(stalls))}, max {Lifecycle.Seconds(stalls.Max())}";
            VmEnvironment.Log(summary);
            Console.WriteLine(summary);
            Assert.True(stalls.Max() < StallBound.TotalSeconds, $"an IO stall of {Lifecycle.Seconds(stalls.Max())} exceeds {StallBound.TotalSeconds} s");
        }
        finally
        {
            Lifecycle.CleanUp();
            File.Delete(Image);
        }
    }
}
