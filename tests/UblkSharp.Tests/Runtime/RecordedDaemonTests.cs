using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Runtime;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// After a stop, `del` kills a daemon that does not exit only when the device's record proves that
/// the process with the daemon's pid is that daemon: a `sleep` stands for an unrelated process that
/// was given a dead daemon's pid.
/// </summary>
public sealed class RecordedDaemonTests : IDisposable
{
    private readonly Process _sleep = Process.Start("sleep", "600");
    private readonly CapturingLoggerFactory _log = new();

    public void Dispose()
    {
        if (!_sleep.HasExited)
        {
            _sleep.Kill();
        }
        _sleep.Dispose();
    }

    private static DeviceRecord RecordOf(int pid, long? started, string? exe) => new()
    {
        Id = 7,
        Pid = pid,
        DaemonStartTime = started,
        DaemonExecutable = exe,
        Target = "null",
        Recipe = [],
        Queues = 1,
        Depth = 128,
        Size = 1 << 20,
    };

    private long SleepStart => Processes.StartTime(_sleep.Id) ?? throw new InvalidOperationException("sleep is gone");

    private void WaitForDaemon(DeviceRecord? record, double seconds = 1)
        => DeviceDeletion.WaitForDaemon(7, _sleep.Id, record, TimeSpan.FromSeconds(seconds), _log.Logger);

    [Fact]
    public void StartTimeAndExecutableNameAProcess()
    {
        Assert.Equal(Processes.StartTime(Environment.ProcessId), Processes.StartTime(Environment.ProcessId));
        Assert.True(SleepStart >= Processes.StartTime(Environment.ProcessId));
        Assert.EndsWith("/sleep", Processes.ExecutablePath(_sleep.Id), StringComparison.Ordinal);
        _sleep.Kill();
        _sleep.WaitForExit();
        Assert.Null(Processes.StartTime(_sleep.Id));
        Assert.Null(Processes.ExecutablePath(_sleep.Id));
    }

    [Fact]
    public void AProcessThatStartedAtAnotherTimeIsNotTheDaemonAndIsNotWaitedFor()
    {
        var sw = Stopwatch.StartNew();
        WaitForDaemon(RecordOf(_sleep.Id, SleepStart - 1, Processes.ExecutablePath(_sleep.Id)), seconds: 20);
        Assert.True(sw.Elapsed < TimeSpan.FromSeconds(10), $"waited {sw.Elapsed} for a process that is provably not the daemon");
        Assert.False(_sleep.HasExited, "an unrelated process was killed");
        Assert.Empty(_log.Messages);
    }

    [Fact]
    public void AProcessOfAnotherExecutableIsNotTheDaemon()
    {
        WaitForDaemon(RecordOf(_sleep.Id, SleepStart, "/usr/bin/ublksharp-daemon"));
        Assert.False(_sleep.HasExited, "an unrelated process was killed");
    }

    [Theory]
    [InlineData(false, "older ublksharp")]
    [InlineData(true, "there is no record")]
    public void WithoutProofNobodyIsKilledAndDelSaysSo(bool noRecord, string why)
    {
        WaitForDaemon(noRecord ? null : RecordOf(_sleep.Id, null, null));
        Assert.False(_sleep.HasExited, "an unrelated process was killed");
        var line = Assert.Single(_log.Messages);
        Assert.Contains($"pid {_sleep.Id} still runs 1 s after the stop; not killing it", line, StringComparison.Ordinal);
        Assert.Contains(why, line, StringComparison.Ordinal);
    }

    [Fact]
    public void ARecordOfAnotherPidProvesNothing()
    {
        WaitForDaemon(RecordOf(_sleep.Id + 1, SleepStart, null));
        Assert.False(_sleep.HasExited, "an unrelated process was killed");
        Assert.Contains("names pid", Assert.Single(_log.Messages), StringComparison.Ordinal);
    }

    [Fact]
    public void TheProvenDaemonIsKilledWhenItIgnoresTheStop()
    {
        WaitForDaemon(RecordOf(_sleep.Id, SleepStart, Processes.ExecutablePath(_sleep.Id)));
        Assert.True(_sleep.WaitForExit(10_000), "the daemon of record outlived its kill");
        Assert.Contains("killing it", Assert.Single(_log.Messages), StringComparison.Ordinal);
    }

    [Fact]
    public void APidfdSignalsAndWaitsForItsOwnProcess()
    {
        using var handle = ProcessHandle.Open(_sleep.Id);
        Assert.NotNull(handle);
        Assert.False(handle.HasExited);
        Assert.False(handle.WaitForExit(TimeSpan.FromMilliseconds(50)));
        Assert.True(handle.Signal(Processes.SIGTERM));
        Assert.True(handle.WaitForExit(TimeSpan.FromSeconds(10)), "the pidfd never said the process exited");
        _sleep.WaitForExit();
        Assert.False(handle.Signal(0), "a pidfd signalled a process that has exited");
    }
}
