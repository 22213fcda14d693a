using System.Diagnostics;
using UblkSharp.Interop;
using UblkSharp.Nbd;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Targets;
using UblkSharp.Tests.Runtime;
using static UblkSharp.Nbd.Protocol.NbdProtocol;

namespace UblkSharp.Tests.Nbd;

/// <summary>
/// The figures an NBD server keeps per export and per connection (<see cref="NbdServer.Stats"/>),
/// counted exactly against what a real client (libnbd) or a hand-driven one did; their Prometheus
/// text, read by prometheus_client's strict parser; the "UblkSharp" meter's NBD instruments; and
/// what recording a request costs.
/// </summary>
public class NbdStatsTests
{
    /// <summary>Both writers: requests run on the connection's thread (inline) and on the workers.</summary>
    [Theory]
    [InlineData(NbdExecution.Inline)]
    [InlineData(NbdExecution.Workers)]
    public void TheCountsAreWhatLibnbdDid(NbdExecution execution)
    {
        using var s = new TestServer(new MemoryTarget(16 << 20), "disk", options: new NbdServerOptions { Execution = execution });
        Tools.Nbdsh(s.Uri, """
            assert h.can_trim() and h.can_zero() and h.can_flush() and h.can_cache()
            for i in range(5):
                h.pread(4096, i * 4096)
            for i in range(3):
                h.pwrite(b'x' * 8192, 65536 + i * 8192)
            for i in range(2):
                h.flush()
            for i in range(4):
                h.trim(4096, 1 << 20)
            h.zero(65536, 2 << 20)
            h.cache(4096, 0)
            h.block_status(8192, 0, lambda *a: 0)
            h.shutdown()
            """);
        var stats = WaitClosed(s.Server, 1);
        var t = Assert.Single(stats.Exports).Total;
        Assert.Equal("disk", stats.Exports[0].Name);
        Assert.Equal([5L, 3, 2, 4, 1, 2], t.Requests); // read, write, flush, discard, write_zeroes, other (cache, block status)
        Assert.Equal(5 * 4096, t.Bytes[(int)StatOp.Read]);
        Assert.Equal(3 * 8192, t.Bytes[(int)StatOp.Write]);
        Assert.Empty(t.Errors);
        Assert.Equal(0, t.InFlight);
        for (var op = 0; op < QueueStats.OpCount; op++)
        {
            Assert.Equal(t.Requests[op], t.Latency[op].Sum());
            Assert.True(t.Requests[op] == 0 || t.LatencySumNs[op] > 0, $"op {op}: no latency summed");
        }
        Assert.Equal(1, stats.Accepted);
        Assert.Equal(1, stats.Closed);
        Assert.Equal(0, stats.OpenConnections);
        Assert.Empty(stats.Connections);
    }

    /// <summary>
    /// A live connection has its own figures (peer: our pid, over a unix socket); refusals count
    /// under their errno; a closed connection's figures stay in the export's totals, and a new
    /// connection's add to them.
    /// </summary>
    [Fact]
    public void AClosedConnectionsCountsStayInTheExportsTotals()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), "ro", readOnly: true);
        using (var c = new RawNbd(s.SocketPath).Connect("ro"))
        {
            c.Request(CmdWrite, 1, 0, 4096, payload: new byte[4096]);
            Assert.Equal(EPERM, c.ReadAnyReply().Error);
            c.Request(CmdRead, 2, 0, 4096);
            Assert.Equal(0u, c.ReadAnyReply(4096).Error);
            var live = s.Server.Stats();
            var conn = Assert.Single(live.Connections);
            Assert.Equal($"pid {Environment.ProcessId}", conn.Peer);
            Assert.Equal("ro", conn.Export);
            Assert.Equal(1, conn.Figures.Requests[(int)StatOp.Write]);
            Assert.Equal(1, conn.Figures.Requests[(int)StatOp.Read]);
            Assert.Equal(4096, conn.Figures.Bytes[(int)StatOp.Read]);
            Assert.Equal(0, conn.Figures.Bytes[(int)StatOp.Write]); // refused: nothing written
            Assert.Equal(new Dictionary<int, long> { [Errno.EPERM] = 1 }, conn.Figures.Errors);
            Assert.Equal(1, live.Exports[0].Connections);
            Assert.Equal(conn.Figures.Requests, live.Exports[0].Total.Requests);
        }
        // Gone without NBD_CMD_DISC: the server sees the end of the stream.
        var after = WaitClosed(s.Server, 1);
        Assert.Empty(after.Connections);
        Assert.Equal(0, after.Exports[0].Connections);
        Assert.Equal(1, after.Exports[0].Total.Requests[(int)StatOp.Read]);
        Assert.Equal(1, after.Exports[0].Total.Errors[Errno.EPERM]);
        using var second = new RawNbd(s.SocketPath).Connect("ro");
        for (ulong i = 0; i < 2; i++)
        {
            second.Request(CmdRead, i, 0, 512);
            Assert.Equal(0u, second.ReadAnyReply(512).Error);
        }
        var both = s.Server.Stats();
        Assert.Equal(2, Assert.Single(both.Connections).Figures.Requests[(int)StatOp.Read]);
        Assert.Equal(3, both.Exports[0].Total.Requests[(int)StatOp.Read]);
        Assert.Equal(4096 + 1024, both.Exports[0].Total.Bytes[(int)StatOp.Read]);
        Assert.Equal(2, both.Accepted);
        Assert.Equal(1, both.Closed);
    }

    /// <summary>A target's failure counts under the target's errno, on a worker and inline alike; a request that never reached it (past the end) under the error it was answered with.</summary>
    [Theory]
    [InlineData(NbdExecution.Inline)]
    [InlineData(NbdExecution.Workers)]
    public void ATargetsEioCountsUnderItsErrno(NbdExecution execution)
    {
        using var s = new TestServer(new FailingTarget(1 << 20), options: new NbdServerOptions { Execution = execution });
        using var c = new RawNbd(s.SocketPath).Connect();
        c.Request(CmdRead, 1, 0, 4096);
        Assert.Equal(EIO, c.ReadAnyReply().Error);
        c.Request(CmdRead, 2, 8192, 4096);
        Assert.Equal(0u, c.ReadAnyReply(4096).Error);
        c.Request(CmdRead, 3, 1 << 20, 4096); // past the end
        Assert.Equal(EINVAL, c.ReadAnyReply().Error);
        var t = s.Server.Stats().Exports[0].Total;
        Assert.Equal(3, t.Requests[(int)StatOp.Read]);
        Assert.Equal(4096, t.Bytes[(int)StatOp.Read]);
        Assert.Equal(new Dictionary<int, long> { [Errno.EIO] = 1, [Errno.EINVAL] = 1 }, t.Errors);
        Assert.Equal(3, t.Latency[(int)StatOp.Read].Sum());
    }

    [Fact]
    public async Task ThePrometheusTextParsesStrictlyWithTheNbdFigures()
    {
        // A name with a quote and a backslash: label values are escaped.
        const string name = "a \"quoted\" \\ disk";
        using var s = new TestServer(new MemoryTarget(1 << 20), name);
        using var c = new RawNbd(s.SocketPath).Connect(name);
        for (ulong i = 0; i < 3; i++)
        {
            c.Request(CmdWrite, i, i * 4096, 4096, payload: new byte[4096]);
            Assert.Equal(0u, c.ReadAnyReply().Error);
        }
        c.Request(CmdRead, 9, 1 << 20, 1);
        Assert.Equal(EINVAL, c.ReadAnyReply().Error);
        var samples = await PrometheusTextTests.ParseStrictly(PrometheusText.Write([], s.Server.Stats()));
        var export = $"export={name}";
        var connection = $"connection=1,{export}"; // labels come sorted: op, then peer
        var peer = $"peer=pid {Environment.ProcessId}";
        Assert.Contains("gauge ublksharp_nbd_connections  1.0", samples);
        Assert.Contains("counter ublksharp_nbd_connections_accepted_total  1.0", samples);
        Assert.Contains("counter ublksharp_nbd_connections_closed_total  0.0", samples);
        Assert.Contains($"counter ublksharp_nbd_requests_total {export},op=write 3.0", samples);
        Assert.Contains($"counter ublksharp_nbd_bytes_total {export},op=write 12288.0", samples);
        Assert.Contains($"counter ublksharp_nbd_errors_total errno=EINVAL,{export} 1.0", samples);
        Assert.Contains($"gauge ublksharp_nbd_inflight_requests {export} 0.0", samples);
        Assert.Contains($"counter ublksharp_nbd_connection_requests_total {connection},op=write,{peer} 3.0", samples);
        Assert.Contains($"counter ublksharp_nbd_connection_requests_total {connection},op=read,{peer} 1.0", samples);
        Assert.Contains($"histogram ublksharp_nbd_request_duration_seconds_count {export},op=write 3.0", samples);
        Assert.Contains($"histogram ublksharp_nbd_request_duration_seconds_bucket {export},le=+Inf,op=read 1.0", samples);
        // No device: none of the device families.
        Assert.DoesNotContain(samples, l => l.Contains(" ublksharp_requests_total", StringComparison.Ordinal));
    }

    [Fact]
    public void TheMeterPublishesTheNbdFigures()
    {
        using var s = new TestServer(new MemoryTarget(1 << 20), "metered");
        using var c = new RawNbd(s.SocketPath).Connect("metered");
        for (ulong i = 0; i < 4; i++)
        {
            c.Request(CmdRead, i, 0, 4096);
            Assert.Equal(0u, c.ReadAnyReply(4096).Error);
        }
        var address = s.Server.Address.ToString();
        // Other tests' servers may be live in this process: only this one's.
        using var meter = new MeterCapture(t => Equals(t.GetValueOrDefault("server"), address));
        meter.Collect();
        Assert.Equal(4, meter.One("ublksharp.nbd.requests", ("export", "metered"), ("op", "read")));
        Assert.Equal(4 * 4096, meter.One("ublksharp.nbd.bytes", ("export", "metered"), ("op", "read")));
        Assert.Equal(0, meter.One("ublksharp.nbd.inflight", ("export", "metered")));
        Assert.Equal(1, meter.One("ublksharp.nbd.connections"));
        Assert.Equal(1, meter.One("ublksharp.nbd.connections.accepted"));
        Assert.Equal(0, meter.One("ublksharp.nbd.connections.closed"));
        Assert.Equal(4, meter.One("ublksharp.nbd.connection.requests", ("connection", 1L), ("peer", $"pid {Environment.ProcessId}"), ("op", "read")));
        Assert.True(meter.One("ublksharp.nbd.latency", ("op", "read"), ("quantile", 0.99)) > 0, "no read latency");
        // A disposed server is no longer published.
        c.Dispose();
        s.Server.Dispose();
        meter.Collect();
        Assert.Empty(meter.Seen);
    }

    /// <summary>
    /// What a request pays for its figures: the connection's own thread (plain increments) and a
    /// worker (atomic ones, uncontended), and the two clock reads alone. Printed, not asserted.
    /// </summary>
    [Fact]
    public void TheCostPerRequestIsPrinted()
    {
        const int n = 1_000_000;
        var s = new QueueStats();
        var sink = 0L;
        // Best of five rounds: the first ones run code the JIT has not optimised yet.
        TimeSpan bare = TimeSpan.MaxValue, own = TimeSpan.MaxValue, shared = TimeSpan.MaxValue;
        for (var round = 0; round < 5; round++)
        {
            var sw = Stopwatch.StartNew();
            for (var i = 0; i < n; i++)
            {
                // The two clock reads a recording makes (arrival, answer), without the recording.
                var start = Stopwatch.GetTimestamp();
                sink += (Stopwatch.GetTimestamp() - start) & 7;
            }
            bare = Min(bare, sw.Elapsed);
            sw.Restart();
            for (var i = 0; i < n; i++)
            {
                s.Completed(StatOp.Read, 4096, Stopwatch.GetTimestamp());
            }
            own = Min(own, sw.Elapsed);
            sw.Restart();
            for (var i = 0; i < n; i++)
            {
                s.CompletedShared(StatOp.Read, 4096, Stopwatch.GetTimestamp());
            }
            shared = Min(shared, sw.Elapsed);
        }
        Assert.Equal(10L * n, s.Snapshot(0).Requests[(int)StatOp.Read]);
        TestContext.Current.TestOutputHelper?.WriteLine(
            $"FIGURE nbd metrics cost per request: {own.TotalNanoseconds / n:0.0} ns on the connection's thread, {shared.TotalNanoseconds / n:0.0} ns on a worker, " +
            $"of which the two clock reads {bare.TotalNanoseconds / n:0.0} ns (best of 5 x {n}; sink {sink})");
    }

    private static TimeSpan Min(TimeSpan a, TimeSpan b) => a < b ? a : b;

    // The server closes a connection on its own thread a moment after the client goes.
    private static NbdServerStats WaitClosed(NbdServer server, long closed)
    {
        var deadline = Environment.TickCount64 + 10_000;
        while (true)
        {
            var stats = server.Stats();
            if (stats.Closed >= closed || Environment.TickCount64 > deadline)
            {
                return stats;
            }
            Thread.Sleep(10);
        }
    }

    /// <summary>A memory target whose reads at offset 0 fail with EIO.</summary>
    private sealed class FailingTarget(long size) : BlockTarget
    {
        private readonly MemoryTarget _inner = new(size);

        public override long Size => _inner.Size;

        public override string Kind => "failing";

        public override int Read(Span<byte> buffer, long offset) => offset == 0 ? -Errno.EIO : _inner.Read(buffer, offset);

        public override int Write(ReadOnlySpan<byte> data, long offset) => _inner.Write(data, offset);

        protected override void Dispose(bool disposing)
        {
            _inner.Dispose();
            base.Dispose(disposing);
        }
    }
}
