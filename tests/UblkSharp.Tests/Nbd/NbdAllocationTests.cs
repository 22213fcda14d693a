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
        // One fio connection for 12 s: measure 4 s of it, once JIT and the slots' buffers are warm.
        var psi = new ProcessStartInfo(Tools.Require("fio")) { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in (string[])["--name=alloc", "--ioengine=nbd", $"--uri={s.Uri}", "--rw=randrw", "--bs=64k", "--iodepth=32",
            "--size=64M", "--time_based", "--runtime=12"])
        {
            psi.ArgumentList.Add(a);
        }
        using var fio = Process.Start(psi)!;
        var output = fio.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
        Thread.Sleep(6000);
        var servedBefore = s.Server.RequestsServed;
        var before = GC.GetTotalAllocatedBytes(precise: true);
        Thread.Sleep(4000);
        var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
        var served = s.Server.RequestsServed - servedBefore;
        Assert.True(fio.WaitForExit(60_000), "fio did not finish");
        Assert.Equal(0, fio.ExitCode);
        Assert.True(served >= 1000, $"{served} requests in 4 s");
        // Whatever else the test process does in those 4 s (the runner, timers) is counted too, so the
        // bar is well above zero but below the smallest object a request could allocate (24 bytes).
        Assert.True(allocated / served < 16, $"{allocated} bytes allocated for {served} requests ({allocated / (double)served:F1} per request)");
        _ = output;
    }
}
