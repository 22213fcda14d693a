using System.Numerics;

namespace UblkSharp.Runtime.Metrics;

/// <summary>
/// Request latencies in fixed log-linear buckets: 4 per power of two from 1 µs (2^10 ns) to about
/// 2^40 ns (18 min), one under and one over. One writer (a queue thread) records with a plain
/// increment: no lock, no allocation; readers (stats, a meter) read each 64-bit count atomically
/// (x64 and arm64 aligned loads) and may see a recording a moment late. A bucket's figures are
/// at most 25% above the latency itself. Where several threads record (an NBD connection's
/// workers) <see cref="RecordShared"/> increments atomically instead.
/// </summary>
public sealed class LatencyHistogram
{
    private const int SubBits = 2;
    private const int SubBuckets = 1 << SubBits;
    private const int FirstPower = 10;
    private const int LastPower = 40;

    /// <summary>Buckets: under 1 µs, (LastPower - FirstPower) * 4 log-linear ones, and the rest.</summary>
    public const int BucketCount = 2 + (LastPower - FirstPower) * SubBuckets;

    private readonly long[] _counts = new long[BucketCount];

    /// <summary>Records one latency in nanoseconds. Single writer only.</summary>
    public void Record(long nanoseconds) => _counts[BucketOf(nanoseconds)]++;

    /// <summary>Records one latency where several threads may record at once (an atomic increment).</summary>
    public void RecordShared(long nanoseconds) => Interlocked.Increment(ref _counts[BucketOf(nanoseconds)]);

    public static int BucketOf(long nanoseconds)
    {
        if (nanoseconds < 1L << FirstPower)
        {
            return 0;
        }
        var power = BitOperations.Log2((ulong)nanoseconds);
        if (power >= LastPower)
        {
            return BucketCount - 1;
        }
        // The two bits under the leading one pick the quarter of the power of two.
        var sub = (int)((ulong)nanoseconds >> (power - SubBits)) & (SubBuckets - 1);
        return 1 + ((power - FirstPower) * SubBuckets) + sub;
    }

    /// <summary>The upper bound (ns, exclusive) of bucket <paramref name="bucket"/>; long.MaxValue for the last.</summary>
    public static long UpperBound(int bucket)
    {
        if (bucket == 0)
        {
            return 1L << FirstPower;
        }
        if (bucket >= BucketCount - 1)
        {
            return long.MaxValue;
        }
        var power = FirstPower + ((bucket - 1) / SubBuckets);
        var sub = (bucket - 1) % SubBuckets;
        return (1L << power) + ((long)(sub + 1) << (power - SubBits));
    }

    /// <summary>A copy of the counts, for percentiles and rates.</summary>
    public long[] Snapshot()
    {
        var copy = new long[BucketCount];
        for (var i = 0; i < BucketCount; i++)
        {
            copy[i] = Volatile.Read(ref _counts[i]);
        }
        return copy;
    }

    /// <summary>Adds another histogram's snapshot into <paramref name="into"/>.</summary>
    public void AddTo(long[] into)
    {
        for (var i = 0; i < BucketCount; i++)
        {
            into[i] += Volatile.Read(ref _counts[i]);
        }
    }

    /// <summary>
    /// The latency (ns) under which a fraction <paramref name="quantile"/> of the counted requests
    /// fell: the upper bound of the bucket it lands in, or 0 if nothing was counted.
    /// </summary>
    public static long Percentile(ReadOnlySpan<long> counts, double quantile)
    {
        long total = 0;
        foreach (var c in counts)
        {
            total += c;
        }
        if (total == 0)
        {
            return 0;
        }
        var rank = (long)Math.Ceiling(Math.Clamp(quantile, 0, 1) * total);
        rank = Math.Max(rank, 1);
        long seen = 0;
        for (var i = 0; i < counts.Length; i++)
        {
            seen += counts[i];
            if (seen >= rank)
            {
                return UpperBound(i);
            }
        }
        return UpperBound(counts.Length - 1);
    }
}
