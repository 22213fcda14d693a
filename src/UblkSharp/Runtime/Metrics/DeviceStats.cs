using System.Buffers;
using System.Text;
using System.Text.Json;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// A device's figures at one moment: each queue's and their sum. As JSON (for `ublksharp stats`):
/// counters, errors by errno name, and latency percentiles in microseconds per operation, plus the
/// raw histogram buckets so a reader can compute rates and percentiles over an interval.
/// </summary>
public sealed record DeviceStats(uint Device, long TakenAtUnixMs, IReadOnlyList<QueueStatsSnapshot> Queues)
{
    public static readonly double[] Quantiles = [0.5, 0.9, 0.99, 0.999];

    private static readonly string[] OpNames = ["read", "write", "flush", "discard", "write_zeroes", "other"];

    public QueueStatsSnapshot Total { get; } = QueueStatsSnapshot.Sum(-1, Queues);

    public static string OpName(StatOp op) => OpNames[(int)op];

    public string ToJson()
    {
        var buffer = new ArrayBufferWriter<byte>(8192);
        using (var w = new Utf8JsonWriter(buffer))
        {
            w.WriteStartObject();
            w.WriteNumber("device", Device);
            w.WriteNumber("takenAtUnixMs", TakenAtUnixMs);
            w.WritePropertyName("total");
            Write(w, Total);
            w.WriteStartArray("queues");
            foreach (var q in Queues)
            {
                Write(w, q);
            }
            w.WriteEndArray();
            w.WriteEndObject();
        }
        return Encoding.UTF8.GetString(buffer.WrittenSpan);
    }

    private static void Write(Utf8JsonWriter w, QueueStatsSnapshot s)
    {
        w.WriteStartObject();
        if (s.Queue >= 0)
        {
            w.WriteNumber("queue", s.Queue);
        }
        w.WriteNumber("inFlight", s.InFlight);
        w.WriteNumber("retries", s.Retries);
        w.WriteStartObject("ops");
        for (var i = 0; i < QueueStats.OpCount; i++)
        {
            w.WriteStartObject(OpNames[i]);
            w.WriteNumber("requests", s.Requests[i]);
            w.WriteNumber("bytes", s.Bytes[i]);
            w.WriteNumber("latencySumNs", s.LatencySumNs[i]);
            w.WriteStartObject("latencyUs");
            foreach (var q in Quantiles)
            {
                w.WriteNumber(QuantileName(q), s.Percentile((StatOp)i, q) / 1000.0);
            }
            w.WriteEndObject();
            // Sparse: bucket index to count, for rates and percentiles over an interval.
            w.WriteStartObject("buckets");
            for (var b = 0; b < s.Latency[i].Length; b++)
            {
                if (s.Latency[i][b] != 0)
                {
                    w.WriteNumber(b.ToString(System.Globalization.CultureInfo.InvariantCulture), s.Latency[i][b]);
                }
            }
            w.WriteEndObject();
            w.WriteEndObject();
        }
        w.WriteEndObject();
        w.WriteStartObject("errors");
        foreach (var (errno, n) in s.Errors.OrderBy(e => e.Key))
        {
            w.WriteNumber(Interop.Errno.Name(errno), n);
        }
        w.WriteEndObject();
        w.WriteEndObject();
    }

    /// <summary>"p50", "p90", "p99", "p99.9".</summary>
    public static string QuantileName(double q) => "p" + (q * 100).ToString("0.###", System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>Reads what <see cref="ToJson"/> wrote; <see cref="JsonException"/> if it is not that.</summary>
    public static DeviceStats Parse(string json)
    {
        using var doc = JsonDocument.Parse(json);
        var root = doc.RootElement;
        try
        {
            var queues = root.GetProperty("queues").EnumerateArray().Select(ParseQueue).ToList();
            return new DeviceStats(root.GetProperty("device").GetUInt32(), root.GetProperty("takenAtUnixMs").GetInt64(), queues);
        }
        catch (Exception e) when (e is KeyNotFoundException or InvalidOperationException or FormatException)
        {
            throw new JsonException($"not a device's figures: {e.Message}", e);
        }
    }

    private static QueueStatsSnapshot ParseQueue(JsonElement q)
    {
        var requests = new long[QueueStats.OpCount];
        var bytes = new long[QueueStats.OpCount];
        var latency = new long[QueueStats.OpCount][];
        var sum = new long[QueueStats.OpCount];
        var ops = q.GetProperty("ops");
        for (var i = 0; i < QueueStats.OpCount; i++)
        {
            var op = ops.GetProperty(OpNames[i]);
            requests[i] = op.GetProperty("requests").GetInt64();
            bytes[i] = op.GetProperty("bytes").GetInt64();
            sum[i] = op.GetProperty("latencySumNs").GetInt64();
            latency[i] = new long[LatencyHistogram.BucketCount];
            foreach (var b in op.GetProperty("buckets").EnumerateObject())
            {
                var index = int.Parse(b.Name, System.Globalization.CultureInfo.InvariantCulture);
                if ((uint)index < LatencyHistogram.BucketCount)
                {
                    latency[i][index] = b.Value.GetInt64();
                }
            }
        }
        var errors = new Dictionary<int, long>();
        foreach (var e in q.GetProperty("errors").EnumerateObject())
        {
            errors[Interop.Errno.Number(e.Name)] = e.Value.GetInt64();
        }
        return new QueueStatsSnapshot(q.GetProperty("queue").GetInt32(), requests, bytes, errors, q.GetProperty("retries").GetInt64(), q.GetProperty("inFlight").GetInt32(), latency, sum);
    }
}
