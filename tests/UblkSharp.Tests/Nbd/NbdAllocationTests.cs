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

    /// <summary>
    /// TLS-PSK: GnuTLS encrypts and decrypts through the connection's own pinned buffers, so a warm
    /// connection allocates nothing per request either. The client is libnbd (python3-libnbd, 16
    /// requests in flight), as fio's nbd engine cannot be given a PSK file.
    /// </summary>
    [Theory]
    [InlineData(NbdExecution.Inline)]
    [InlineData(NbdExecution.Workers)]
    public void SteadyStateTlsPskRequestsAllocateNothing(NbdExecution execution)
    {
        var keys = Directory.CreateTempSubdirectory("ublksharp-alloc-psk-").FullName;
        try
        {
            var keyFile = Path.Combine(keys, "keys.psk");
            File.WriteAllText(keyFile, $"alice:{Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(32))}\n");
            using var s = new TestServer(new MemoryTarget(64 << 20), "disk", options: new NbdServerOptions
            {
                Execution = execution,
                Tls = NbdTlsOptions.LoadPsk(keyFile, NbdTlsMode.Require),
            }, tcp: true);
            const long WarmUp = 10_000, Measured = 10_000;
            const string script = """
                import nbd, sys
                h = nbd.NBD()
                h.set_tls(nbd.TLS_REQUIRE)
                h.set_tls_psk_file(sys.argv[1])
                h.set_tls_username('alice')
                h.set_export_name('disk')
                h.connect_tcp('127.0.0.1', sys.argv[2])
                assert h.get_tls_negotiated()
                write = nbd.Buffer.from_bytearray(bytearray(b'psk!' * 16384))
                read = nbd.Buffer(65536)
                sent = 0
                while sent < 30000 or h.aio_in_flight() > 0:
                    while sent < 30000 and h.aio_in_flight() < 16:
                        offset = (sent * 7919 % 1024) * 65536
                        if sent % 2:
                            h.aio_pwrite(write, offset, completion=lambda e: 1)
                        else:
                            h.aio_pread(read, offset, completion=lambda e: 1)
                        sent += 1
                    h.poll(-1)
                h.shutdown()
                """;
            var psi = new ProcessStartInfo(Tools.Require("/usr/bin/python3")) { RedirectStandardOutput = true };
            foreach (var a in (string[])["-c", script, keyFile, s.Server.Address.Port.ToString(System.Globalization.CultureInfo.InvariantCulture)])
            {
                psi.ArgumentList.Add(a);
            }
            using var client = Process.Start(psi)!;
            var output = client.StandardOutput.ReadToEndAsync(TestContext.Current.CancellationToken);
            WaitForServed(s.Server, WarmUp, client);
            var servedBefore = s.Server.RequestsServed;
            var before = GC.GetTotalAllocatedBytes(precise: true);
            WaitForServed(s.Server, servedBefore + Measured, client);
            var allocated = GC.GetTotalAllocatedBytes(precise: true) - before;
            var served = s.Server.RequestsServed - servedBefore;
            Assert.True(client.WaitForExit(300_000), "the libnbd client did not finish within 5 minutes");
            client.WaitForExit();
            Assert.True(client.ExitCode == 0, $"the libnbd client exited {client.ExitCode} (its stderr is the runner's)");
            _ = output;
            TestContext.Current.TestOutputHelper?.WriteLine($"{execution}: {allocated} bytes allocated for {served} requests over TLS-PSK");
            Assert.Equal(0, s.Server.TlsFailures);
            Assert.True(allocated / served < 16, $"{allocated} bytes allocated for {served} requests over TLS-PSK ({allocated / (double)served:F1} per request)");
        }
        finally
        {
            Directory.Delete(keys, recursive: true);
        }
    }

    /// <summary>Polls (allocating nothing) until the server has served <paramref name="count"/> requests; fails if the client ends first or 5 minutes pass.</summary>
    private static void WaitForServed(NbdServer server, long count, Process client)
    {
        var deadline = Stopwatch.GetTimestamp() + (300 * Stopwatch.Frequency);
        while (server.RequestsServed < count)
        {
            // Messages built only on failure: the poll runs inside the measured window.
            if (client.HasExited)
            {
                Assert.Fail($"the client ended after {server.RequestsServed} requests, before {count}");
            }
            if (Stopwatch.GetTimestamp() > deadline)
            {
                Assert.Fail($"only {server.RequestsServed} of {count} requests served in 5 minutes");
            }
            Thread.Sleep(50);
        }
    }
}
