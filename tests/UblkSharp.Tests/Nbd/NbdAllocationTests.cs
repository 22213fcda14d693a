using System.Diagnostics;
using UblkSharp.Nbd;
using UblkSharp.Targets;

namespace UblkSharp.Tests.Nbd;

/// <summary>Serving requests allocates nothing per request once a connection is warm (buffers are kept per slot).</summary>
[Collection(nameof(NbdSerialCollection))]
public class NbdAllocationTests
{
    [Theory]
    [InlineData(NbdExecution.Inline)]
    [InlineData(NbdExecution.Workers)]
    public void SteadyStateRequestsAllocateNothing(NbdExecution execution)
    {
        using var s = new TestServer(new MemoryTarget(64 << 20), options: new NbdServerOptions { Execution = execution });
        // One fio connection of a fixed amount of IO (64 MiB 40 times, 40,960 requests): measure
        // 10,000 requests once 10,000 have warmed JIT and the slots' buffers. Counted in requests,
        // not seconds, so a loaded machine only makes it slower.
        const long WarmUp = 10_000, Measured = 10_000;
        var psi = new ProcessStartInfo(Tools.Require("fio")) { RedirectStandardOutput = true };
        foreach (var a in (string[])["--name=alloc", "--ioengine=nbd", $"--uri={s.Uri}", "--rw=randrw", "--bs=64k", "--iodepth=32",
            "--size=64M", "--loops=40"])
        {
            psi.ArgumentList.Add(a);
        }
        using var fio = Process.Start(psi)!;
        var output = fio.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        WaitForServed(s.Server, WarmUp, fio);
        var servedBefore = s.Server.RequestsServed;
        var before = GC.GetTotalAllocatedBytes(precise: true);
        WaitForServed(s.Server, servedBefore + Measured, fio);
        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        var served = s.Server.RequestsServed - servedBefore;
        Assert.True(fio.WaitForExit(300_000), "fio did not finish within 5 minutes");
        Assert.Equal(0, fio.ExitCode);
        _ = output;
        // Whatever else the test process does meanwhile (the runner, timers, this poll) is counted too, so the
        // bar is well above zero but below the smallest object a request could allocate (24 bytes).
        Assert.True(allocated / served < 16, $"{allocated} bytes allocated for {served} requests ({allocated / (double)served:F1} per request)");
    }

    /// <summary>Polls (allocating nothing) until the server has served <paramref name="count"/> requests; fails if fio ends first or 5 minutes pass.</summary>
    private static void WaitForServed(NbdServer server, long count, Process fio)
    {
        var deadline = Stopwatch.GetTimestamp() + (300 * Stopwatch.Frequency);
        while (server.RequestsServed < count)
        {
            // Messages built only on failure: the poll runs inside the measured window.
            if (fio.HasExited)
            {
                Assert.Fail($"fio ended after {server.RequestsServed} requests, before {count}");
            }
            if (Stopwatch.GetTimestamp() > deadline)
            {
                Assert.Fail($"only {server.RequestsServed} of {count} requests served in 5 minutes");
            }
            Thread.Sleep(50);
        }
    }
}
