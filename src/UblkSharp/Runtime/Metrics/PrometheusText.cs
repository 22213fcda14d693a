using System.Globalization;
using System.Text;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// Devices' figures in the Prometheus text exposition format (version 0.0.4): counters of requests,
/// bytes, errors and retries per device and queue, requests in flight, and a latency histogram per
/// device and operation over the fixed buckets of <see cref="LatencyHistogram"/> (their upper bounds
/// as `le`, in seconds).
/// </summary>
public static class PrometheusText
{
    public const string ContentType = "text/plain; version=0.0.4; charset=utf-8";

    public static string Write(IEnumerable<DeviceStats> devices)
    {
        var all = devices.OrderBy(d => d.Device).ToList();
        var b = new StringBuilder(4096);
        Family(b, "ublksharp_requests_total", "counter", "Requests answered, by device, queue and operation", all, (d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)q.Requests[i])));
        Family(b, "ublksharp_bytes_total", "counter", "Bytes read and written, by device, queue and operation", all, (d, q) =>
            Enumerable.Range(0, 2).Select(i => ($"op=\"{DeviceStats.OpName((StatOp)i)}\"", (double)q.Bytes[i])));
        Family(b, "ublksharp_errors_total", "counter", "Requests answered with an error, by device, queue and errno", all, (d, q) =>
            q.Errors.OrderBy(e => e.Key).Select(e => ($"errno=\"{Interop.Errno.Name(e.Key)}\"", (double)e.Value)));
        Family(b, "ublksharp_retries_total", "counter", "Backend steps submitted again (short IO, EAGAIN)", all, (d, q) =>
            [("", (double)q.Retries)]);
        Family(b, "ublksharp_inflight_requests", "gauge", "Requests the daemon holds", all, (d, q) =>
            [("", (double)q.InFlight)]);
        b.Append("# HELP ublksharp_request_duration_seconds Time from a request's arrival to its answer, by device and operation\n");
        b.Append("# TYPE ublksharp_request_duration_seconds histogram\n");
        foreach (var d in all)
        {
            var t = d.Total;
            for (var i = 0; i < QueueStats.OpCount; i++)
            {
                var labels = $"device=\"{d.Device}\",op=\"{DeviceStats.OpName((StatOp)i)}\"";
                long cumulative = 0;
                for (var k = 0; k < LatencyHistogram.BucketCount - 1; k++)
                {
                    cumulative += t.Latency[i][k];
                    b.Append("ublksharp_request_duration_seconds_bucket{").Append(labels).Append(",le=\"")
                        .Append(Seconds(LatencyHistogram.UpperBound(k))).Append("\"} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
                }
                cumulative += t.Latency[i][LatencyHistogram.BucketCount - 1];
                b.Append("ublksharp_request_duration_seconds_bucket{").Append(labels).Append(",le=\"+Inf\"} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
                b.Append("ublksharp_request_duration_seconds_sum{").Append(labels).Append("} ").Append(Seconds(t.LatencySumNs[i])).Append('\n');
                b.Append("ublksharp_request_duration_seconds_count{").Append(labels).Append("} ").Append(cumulative.ToString(CultureInfo.InvariantCulture)).Append('\n');
            }
        }
        return b.ToString();
    }

    private static string Seconds(long ns) => (ns / 1e9).ToString("R", CultureInfo.InvariantCulture);

    private static void Family(StringBuilder b, string name, string type, string help, List<DeviceStats> all,
        Func<DeviceStats, QueueStatsSnapshot, IEnumerable<(string Labels, double Value)>> samples)
    {
        b.Append("# HELP ").Append(name).Append(' ').Append(help).Append('\n');
        b.Append("# TYPE ").Append(name).Append(' ').Append(type).Append('\n');
        foreach (var d in all)
        {
            foreach (var q in d.Queues)
            {
                foreach (var (labels, value) in samples(d, q))
                {
                    b.Append(name).Append("{device=\"").Append(d.Device).Append("\",queue=\"").Append(q.Queue).Append('"');
                    if (labels.Length > 0)
                    {
                        b.Append(',').Append(labels);
                    }
                    b.Append("} ").Append(value.ToString("R", CultureInfo.InvariantCulture)).Append('\n');
                }
            }
        }
    }
}
