namespace UblkSharp.Nbd;

/// <summary>
/// At most one log line per interval for one kind of event: a flood of refused or timed-out
/// connections (a client attacking the server) must not flood the log too. The events left out
/// are counted and the count goes with the next line.
/// </summary>
internal sealed class LogThrottle(TimeSpan interval)
{
    private readonly object _lock = new();
    private long _nextAt = long.MinValue;
    private long _suppressed;

    /// <summary>Whether to log this event now; if so, <paramref name="suppressed"/> says how many were left out since the last line.</summary>
    public bool ShouldLog(out long suppressed)
    {
        var now = Environment.TickCount64;
        lock (_lock)
        {
            if (now < _nextAt)
            {
                _suppressed++;
                suppressed = 0;
                return false;
            }
            _nextAt = now + (long)interval.TotalMilliseconds;
            suppressed = _suppressed;
            _suppressed = 0;
            return true;
        }
    }

    /// <summary>" (N more since the last message)", or nothing.</summary>
    public static string More(long suppressed) => suppressed > 0 ? $" ({suppressed} more since the last message)" : "";
}
