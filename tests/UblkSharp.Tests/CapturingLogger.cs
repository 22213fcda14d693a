using System.Collections.Concurrent;
using Microsoft.Extensions.Logging;

namespace UblkSharp.Tests;

/// <summary>A logger factory that keeps every entry, for tests of what the library logs.</summary>
internal sealed class CapturingLoggerFactory : ILoggerFactory
{
    public sealed record Entry(string Category, LogLevel Level, EventId EventId, string Message, Exception? Exception);

    public ConcurrentQueue<Entry> Entries { get; } = new();

    /// <summary>The messages alone, in order.</summary>
    public IEnumerable<string> Messages => Entries.Select(e => e.Message);

    /// <summary>A logger that is not tied to a category.</summary>
    public ILogger Logger => CreateLogger("test");

    public ILogger CreateLogger(string categoryName) => new Capturing(this, categoryName);

    public void AddProvider(ILoggerProvider provider) => throw new NotSupportedException();

    public void Dispose()
    {
    }

    private sealed class Capturing(CapturingLoggerFactory owner, string category) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => true;

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            => owner.Entries.Enqueue(new Entry(category, logLevel, eventId, formatter(state, exception), exception));
    }
}
