using System.Diagnostics;
using UblkSharp.Runtime.Metrics;
using UblkSharp.Ublk;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// The figures a queue keeps (counts, bytes, errors by errno, latency buckets), their JSON for
/// `ublksharp stats`, and the "UblkSharp" meter as a MeterListener sees it. The latency is also
/// timed per recording, against a loop without it, as the hot path's cost.
/// </summary>
public class MetricsTests
{
    [Fact]
    public void BucketsAreOrderedAndHoldWhatTheyCount()
    {
        long previous = 0;
        for (var b = 0; b < LatencyHistogram.BucketCount - 1; b++)
        {
            var upper = LatencyHistogram.UpperBound(b);
            Assert.True(upper > previous, $"bucket {b}: upper bound {upper} after {previous}");
            // The last value under the bound lands in this bucket, the bound itself in the next.
            Assert.Equal(b, LatencyHistogram.BucketOf(upper - 1));
            Assert.Equal(b + 1, LatencyHistogram.BucketOf(upper));
            // Log-linear: a bucket is at most a quarter of its power of two wide, so at most 25% over its values.
            if (b > 0)
            {
                Assert.True(upper <= (previous * 5 / 4) + 1, $"bucket {b} is too wide: {previous}..{upper}");
            }
            previous = upper;
        }
        Assert.Equal(0, LatencyHistogram.BucketOf(0));
        Assert.Equal(0, LatencyHistogram.BucketOf(-5));
        Assert.Equal(LatencyHistogram.BucketCount - 1, LatencyHistogram.BucketOf(long.MaxValue));
    }

    [Fact]
    public void PercentilesComeFromTheBuckets()
    {
        var h = new LatencyHistogram();
        for (var i = 0; i < 990; i++)
        {
            h.Record(10_000); // 10 µs
        }
        for (var i = 0; i < 10; i++)
        {
            h.Record(5_000_000); // 5 ms
        }
        var counts = h.Snapshot();
        Assert.Equal(1000, counts.Sum());
        AssertNear(10_000, LatencyHistogram.Percentile(counts, 0.5));
        AssertNear(10_000, LatencyHistogram.Percentile(counts, 0.99));
        AssertNear(5_000_000, LatencyHistogram.Percentile(counts, 0.999));
        Assert.Equal(0, LatencyHistogram.Percentile(new long[LatencyHistogram.BucketCount], 0.5));
    }

    private static void AssertNear(long expected, long bound) =>
        Assert.True(bound > expected && bound <= expected * 5 / 4, $"percentile {bound} ns for {expected} ns");

    [Fact]
    public void AQueueCountsRequestsBytesErrorsAndRetries()
    {
        var s = new QueueStats();
        var t0 = Stopwatch.GetTimestamp();
        s.Completed(IoOp.Read, 4096, t0);
        s.Completed(IoOp.Read, 8192, t0);
        s.Completed(IoOp.Write, 512, t0);
        s.Completed(IoOp.Write, -5, t0); // EIO
        s.Completed(IoOp.Flush, 0, t0);
        s.Retried();
        var snap = s.Snapshot(3, inFlight: 1);
        Assert.Equal(3, snap.Queue);
        Assert.Equal(2, snap.Requests[(int)StatOp.Read]);
        Assert.Equal(2, snap.Requests[(int)StatOp.Write]);
        Assert.Equal(1, snap.Requests[(int)StatOp.Flush]);
        Assert.Equal(12288, snap.Bytes[(int)StatOp.Read]);
        Assert.Equal(512, snap.Bytes[(int)StatOp.Write]);
        Assert.Equal(new Dictionary<int, long> { [5] = 1 }, snap.Errors);
        Assert.Equal(1, snap.InFlight);
        Assert.Equal(1, snap.Retries);
        Assert.Equal(2, snap.Latency[(int)StatOp.Read].Sum());
        var sum = QueueStatsSnapshot.Sum(-1, [snap, snap]);
        Assert.Equal(4, sum.Requests[(int)StatOp.Read]);
        Assert.Equal(2, sum.Errors[5]);
        Assert.Equal(4, sum.Latency[(int)StatOp.Read].Sum());
    }

    [Fact]
    public void TheFiguresRoundTripThroughJson()
    {
        var q0 = new QueueStats();
        var q1 = new QueueStats();
        var t0 = Stopwatch.GetTimestamp() - Stopwatch.Frequency / 1000; // 1 ms ago
        q0.Completed(IoOp.Read, 4096, t0);
        q1.Completed(IoOp.Discard, -95, t0); // EOPNOTSUPP
        var stats = new DeviceStats(4, 1234, [q0.Snapshot(0), q1.Snapshot(1, inFlight: 1)]);
        var json = stats.ToJson();
        Assert.Contains("\"EOPNOTSUPP\":1", json, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', json); // one line per device
        var back = DeviceStats.Parse(json);
        Assert.Equal(4u, back.Device);
        Assert.Equal(2, back.Queues.Count);
        Assert.Equal(stats.Total.Requests, back.Total.Requests);
        Assert.Equal(stats.Total.Bytes, back.Total.Bytes);
        Assert.Equal(stats.Total.Errors, back.Total.Errors);
        Assert.Equal(1, back.Total.InFlight);
        for (var op = 0; op < QueueStats.OpCount; op++)
        {
            Assert.Equal(stats.Total.Latency[op], back.Total.Latency[op]);
        }
        var p50 = back.Total.Percentile(StatOp.Read, 0.5);
        Assert.True(p50 >= 1_000_000, $"a read that took 1 ms has p50 {p50} ns");
        Assert.Throws<System.Text.Json.JsonException>(() => DeviceStats.Parse("{\"device\":1}"));
    }

    [Fact]
    public void TheMeterPublishesEachDevicesFigures()
    {
        var q = new QueueStats();
        var t0 = Stopwatch.GetTimestamp();
        for (var i = 0; i < 7; i++)
        {
            q.Completed(IoOp.Write, 65536, t0);
        }
        q.Completed(IoOp.Read, -5, t0);
        var owner = new object();
        const uint device = 4242;
        using var meter = new MeterCapture(t => t.GetValueOrDefault("device") is long d && d == device);
        UblkMeter.Add(owner, () => new DeviceStats(device, 0, [q.Snapshot(0)]));
        try
        {
            meter.Collect();
        }
        finally
        {
            UblkMeter.Remove(owner);
        }
        Assert.Equal(7, meter.One("ublksharp.device.requests", ("op", "write")));
        Assert.Equal(1, meter.One("ublksharp.device.requests", ("op", "read")));
        Assert.Equal(7 * 65536, meter.One("ublksharp.device.bytes", ("op", "write")));
        Assert.Equal(1, meter.One("ublksharp.device.errors", ("errno", "EIO")));
        Assert.Equal(0, meter.One("ublksharp.device.inflight", ("queue", 0L)));
        Assert.True(meter.One("ublksharp.device.latency", ("op", "write"), ("quantile", 0.99)) > 0, "no write latency");
        // Removed: nothing more of it.
        meter.Collect();
        Assert.Empty(meter.Seen);
    }

    /// <summary>
    /// What a request pays for its figures: a timestamp at arrival and the recording at commit,
    /// timed against the same loop without them. Printed, not asserted (timing is the benchmark's
    /// job); it asserts only that every recording counted.
    /// </summary>
    [Fact]
    public void TheCostPerRequestIsPrinted()
    {
        const int n = 2_000_000;
        var s = new QueueStats();
        var sink = 0L;
        var sw = Stopwatch.StartNew();
        for (var i = 0; i < n; i++)
        {
            sink += i & 7;
        }
        var bare = sw.Elapsed;
        sw.Restart();
        for (var i = 0; i < n; i++)
        {
            var start = Stopwatch.GetTimestamp();
            s.Completed(IoOp.Read, 4096, start);
            sink += i & 7;
        }
        var with = sw.Elapsed;
        Assert.Equal(n, s.Snapshot(0).Requests[(int)StatOp.Read]);
        TestContext.Current.TestOutputHelper?.WriteLine($"FIGURE metrics cost per request: {(with - bare).TotalNanoseconds / n:0.0} ns ({n} requests; sink {sink})");
    }
}
