using System.Diagnostics;
using System.Runtime.CompilerServices;
using UblkSharp.Ublk;

namespace UblkSharp.Runtime.Metrics;

/// <summary>The operations counted apart (<see cref="QueueStats"/>).</summary>
public enum StatOp
{
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
    Other,
}

/// <summary>
/// One queue's figures: requests, bytes, errors by errno and latency per operation. Written by the
/// queue's thread alone (plain increments: no lock, no allocation per IO), read by anyone at any
/// time through <see cref="Snapshot"/>, which may be a request behind. An NBD connection keeps the
/// same figures (one set its own thread writes, one its server's workers write with
/// <see cref="CompletedShared"/>).
/// </summary>
public sealed class QueueStats
{
    /// <summary>Errnos counted one by one (the rest under <see cref="MaxErrno"/>).</summary>
    public const int MaxErrno = 134;

    public const int OpCount = 6;

    private readonly long[] _requests = new long[OpCount];
    private readonly long[] _bytes = new long[OpCount];
    private readonly long[] _errors = new long[MaxErrno + 1];
    private readonly LatencyHistogram[] _latency = [new(), new(), new(), new(), new(), new()];
    private readonly long[] _latencySum = new long[OpCount];
    private long _retries;

    // Stopwatch ticks to ns: 1 where the clock counts ns (Linux), else the ratio.
    private static readonly double NsPerTick = 1e9 / Stopwatch.Frequency;
    private static readonly bool TicksAreNs = Stopwatch.Frequency == 1_000_000_000;

    public static StatOp OpOf(IoOp op) => op switch
    {
        IoOp.Read => StatOp.Read,
        IoOp.Write => StatOp.Write,
        IoOp.Flush => StatOp.Flush,
        IoOp.Discard => StatOp.Discard,
        IoOp.WriteZeroes => StatOp.WriteZeroes,
        _ => StatOp.Other,
    };

    /// <summary>
    /// A request was answered with <paramref name="result"/> (bytes, or -errno) after arriving at
    /// <paramref name="startTicks"/> (<see cref="Stopwatch.GetTimestamp"/>).
    /// </summary>
    public void Completed(IoOp op, int result, long startTicks) => Completed(OpOf(op), result, startTicks);

    /// <inheritdoc cref="Completed(IoOp, int, long)"/>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public void Completed(StatOp op, int result, long startTicks)
    {
        var kind = (int)op;
        _requests[kind]++;
        if (result > 0)
        {
            _bytes[kind] += result;
        }
        else if (result < 0)
        {
            _errors[Math.Min(-result, MaxErrno)]++;
        }
        var ns = Nanoseconds(Stopwatch.GetTimestamp() - startTicks);
        _latency[kind].Record(ns);
        _latencySum[kind] += ns;
    }

    /// <summary>
    /// <see cref="Completed(StatOp, int, long)"/> where several threads may record into these
    /// figures at once (an NBD connection's requests finished on the server's workers): atomic
    /// increments, still no lock and no allocation.
    /// </summary>
    public void CompletedShared(StatOp op, int result, long startTicks)
    {
        var kind = (int)op;
        Interlocked.Increment(ref _requests[kind]);
        if (result > 0)
        {
            Interlocked.Add(ref _bytes[kind], result);
        }
        else if (result < 0)
        {
            Interlocked.Increment(ref _errors[Math.Min(-result, MaxErrno)]);
        }
        var ns = Nanoseconds(Stopwatch.GetTimestamp() - startTicks);
        _latency[kind].RecordShared(ns);
        Interlocked.Add(ref _latencySum[kind], ns);
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static long Nanoseconds(long ticks) => TicksAreNs ? ticks : (long)(ticks * NsPerTick);

    /// <summary>A backend step was submitted again (short IO, EAGAIN).</summary>
    public void Retried() => _retries++;

    /// <summary>
    /// The figures now, as plain data. Requests in flight are the queue's own count of the tags it
    /// holds (<paramref name="inFlight"/>), not counted again here.
    /// </summary>
    public QueueStatsSnapshot Snapshot(int queueId, int inFlight = 0)
    {
        var requests = new long[OpCount];
        var bytes = new long[OpCount];
        var latency = new long[OpCount][];
        var sum = new long[OpCount];
        for (var i = 0; i < OpCount; i++)
        {
            sum[i] = Volatile.Read(ref _latencySum[i]);
            requests[i] = Volatile.Read(ref _requests[i]);
            bytes[i] = Volatile.Read(ref _bytes[i]);
            latency[i] = _latency[i].Snapshot();
        }
        var errors = new Dictionary<int, long>();
        for (var e = 1; e <= MaxErrno; e++)
        {
            if (Volatile.Read(ref _errors[e]) is var n and > 0)
            {
                errors[e] = n;
            }
        }
        return new QueueStatsSnapshot(queueId, requests, bytes, errors, Volatile.Read(ref _retries), Math.Max(0, inFlight), latency, sum);
    }
}

/// <summary>One queue's figures at one moment (<see cref="QueueStats.Snapshot"/>); arrays are indexed by <see cref="StatOp"/>.</summary>
public sealed record QueueStatsSnapshot(int Queue, long[] Requests, long[] Bytes, Dictionary<int, long> Errors, long Retries, int InFlight, long[][] Latency, long[] LatencySumNs)
{
    public long TotalRequests => Requests.Sum();

    public long TotalErrors => Errors.Values.Sum();

    /// <summary>The latency percentile (ns) of one operation (<see cref="LatencyHistogram.Percentile"/>).</summary>
    public long Percentile(StatOp op, double quantile) => LatencyHistogram.Percentile(Latency[(int)op], quantile);

    /// <summary>No requests yet (a queue a reader has not seen before).</summary>
    public static QueueStatsSnapshot Empty(int queue) => Sum(queue, []);

    /// <summary>The figures of several queues as one (the device's).</summary>
    public static QueueStatsSnapshot Sum(int queue, IEnumerable<QueueStatsSnapshot> parts)
    {
        var requests = new long[QueueStats.OpCount];
        var bytes = new long[QueueStats.OpCount];
        var latency = new long[QueueStats.OpCount][];
        var sum = new long[QueueStats.OpCount];
        for (var i = 0; i < QueueStats.OpCount; i++)
        {
            latency[i] = new long[LatencyHistogram.BucketCount];
        }
        var errors = new Dictionary<int, long>();
        long retries = 0;
        var inFlight = 0;
        foreach (var p in parts)
        {
            for (var i = 0; i < QueueStats.OpCount; i++)
            {
                requests[i] += p.Requests[i];
                sum[i] += p.LatencySumNs[i];
                bytes[i] += p.Bytes[i];
                for (var b = 0; b < LatencyHistogram.BucketCount; b++)
                {
                    latency[i][b] += p.Latency[i][b];
                }
            }
            foreach (var (e, n) in p.Errors)
            {
                errors[e] = errors.GetValueOrDefault(e) + n;
            }
            retries += p.Retries;
            inFlight += p.InFlight;
        }
        return new QueueStatsSnapshot(queue, requests, bytes, errors, retries, inFlight, latency, sum);
    }
}
