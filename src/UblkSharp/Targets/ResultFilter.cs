namespace UblkSharp.Targets;

/// <summary>
/// Sees every backend step's result before the runtime (or the NBD server) acts on it, and may
/// hold a request before its backend work starts. It is how a wrapper target changes outcomes
/// that never pass through its own methods, such as completions read from the queue's io_uring.
/// One instance per ublk queue or NBD connection (<see cref="BlockTarget.CreateResultFilter"/>),
/// used by one thread at a time; the caller never blocks a ublk queue thread for a delay.
/// A thrown exception fails that one request with EIO.
/// </summary>
public abstract class ResultFilter
{
    /// <summary>How long to hold a new request before starting it; zero (the default) starts it at once.</summary>
    public virtual TimeSpan DrawDelay() => TimeSpan.Zero;

    /// <summary>
    /// Rewrites one step's result (bytes done, or a negative errno). <paramref name="isData"/> marks
    /// READ/WRITE steps; <paramref name="blockSize"/> is the device's logical block size.
    /// </summary>
    public abstract int Apply(int result, bool isData, int blockSize);

    /// <summary>Both filters, <paramref name="inner"/>'s first (it sits closer to the storage); either may be null.</summary>
    public static ResultFilter? Chain(ResultFilter? inner, ResultFilter? outer)
        => inner is null ? outer : outer is null ? inner : new Chained(inner, outer);

    private sealed class Chained(ResultFilter inner, ResultFilter outer) : ResultFilter
    {
        public override TimeSpan DrawDelay() => inner.DrawDelay() + outer.DrawDelay();

        public override int Apply(int result, bool isData, int blockSize)
            => outer.Apply(inner.Apply(result, isData, blockSize), isData, blockSize);
    }
}
