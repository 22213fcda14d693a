using System.Diagnostics.Metrics;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// The figures of every live device in this process, published through System.Diagnostics.Metrics
/// (a <see cref="Meter"/> named "UblkSharp"), so an OpenTelemetry exporter or a MeterListener picks
/// them up with no extra code. Every instrument is observable: nothing is recorded per IO beyond the
/// queues' own counters, which are read when a listener collects.
/// </summary>
public static class UblkMeter
{
    public const string Name = "UblkSharp";

    private static readonly Lock Gate = new();
    private static readonly Dictionary<object, Func<DeviceStats>> Sources = [];

    public static Meter Meter { get; } = new(Name, DeviceRecord.CurrentVersion);

    static UblkMeter()
    {
        Meter.CreateObservableCounter("ublksharp.device.requests", () => Each((d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Select(i => new Measurement<long>(q.Requests[i], Tags(d, q, ("op", DeviceStats.OpName((StatOp)i)))))),
            "{request}", "Requests answered, by device, queue and operation");
        Meter.CreateObservableCounter("ublksharp.device.bytes", () => Each((d, q) =>
            Enumerable.Range(0, QueueStats.OpCount).Where(i => q.Bytes[i] > 0 || i < 2).Select(i => new Measurement<long>(q.Bytes[i], Tags(d, q, ("op", DeviceStats.OpName((StatOp)i)))))),
            "By", "Bytes read and written, by device, queue and operation");
        Meter.CreateObservableCounter("ublksharp.device.errors", () => Each((d, q) =>
            q.Errors.Select(e => new Measurement<long>(e.Value, Tags(d, q, ("errno", Interop.Errno.Name(e.Key)))))),
            "{request}", "Requests answered with an error, by device, queue and errno");
        Meter.CreateObservableCounter("ublksharp.device.retries", () => Each((d, q) =>
            new[] { new Measurement<long>(q.Retries, Tags(d, q)) }),
            "{step}", "Backend steps submitted again (short IO, EAGAIN)");
        Meter.CreateObservableUpDownCounter("ublksharp.device.inflight", () => Each((d, q) =>
            new[] { new Measurement<int>(q.InFlight, Tags(d, q)) }),
            "{request}", "Requests the daemon holds");
        Meter.CreateObservableGauge("ublksharp.device.latency", () => Snapshots().SelectMany(s =>
            Enumerable.Range(0, QueueStats.OpCount).Where(i => s.Total.Requests[i] > 0).SelectMany(i => DeviceStats.Quantiles.Select(quantile =>
                new Measurement<double>(s.Total.Percentile((StatOp)i, quantile) / 1e9,
                    new KeyValuePair<string, object?>("device", (long)s.Device),
                    new KeyValuePair<string, object?>("op", DeviceStats.OpName((StatOp)i)),
                    new KeyValuePair<string, object?>("quantile", quantile))))),
            "s", "Request latency percentiles since the device started, by device and operation (bucket upper bounds)");
    }

    /// <summary>Publishes a device's figures (its queues are running); <see cref="UblkDevice"/> calls it.</summary>
    internal static void Add(object owner, Func<DeviceStats> source)
    {
        lock (Gate)
        {
            Sources[owner] = source;
        }
    }

    internal static void Remove(object owner)
    {
        lock (Gate)
        {
            Sources.Remove(owner);
        }
    }

    private static List<DeviceStats> Snapshots()
    {
        Func<DeviceStats>[] sources;
        lock (Gate)
        {
            sources = [.. Sources.Values];
        }
        return [.. sources.Select(s => s())];
    }

    private static IEnumerable<Measurement<T>> Each<T>(Func<DeviceStats, QueueStatsSnapshot, IEnumerable<Measurement<T>>> per)
        where T : struct
        => Snapshots().SelectMany(d => d.Queues.SelectMany(q => per(d, q)));

    private static KeyValuePair<string, object?>[] Tags(DeviceStats d, QueueStatsSnapshot q, params (string Key, object Value)[] more)
    {
        var tags = new KeyValuePair<string, object?>[2 + more.Length];
        tags[0] = new("device", (long)d.Device);
        tags[1] = new("queue", (long)q.Queue);
        for (var i = 0; i < more.Length; i++)
        {
            tags[2 + i] = new(more[i].Key, more[i].Value);
        }
        return tags;
    }
}
