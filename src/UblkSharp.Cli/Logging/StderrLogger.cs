using Microsoft.Extensions.Logging;

namespace UblkSharp.Cli.Logging;

/// <summary>
/// The CLI's logging: one line per message on stderr (see <see cref="JournalFormat"/>), messages
/// below <see cref="MinimumLevel"/> dropped. It is the only provider, so it is its own factory too:
/// no container to build at every start of the command.
/// </summary>
internal sealed class StderrLoggerProvider(LogLevel minimumLevel, bool journal, TextWriter? writer = null) : ILoggerProvider, ILoggerFactory
{
    private readonly TextWriter _writer = writer ?? Console.Error;

    public LogLevel MinimumLevel { get; } = minimumLevel;

    /// <summary>Whether lines go out in the journal's format.</summary>
    public bool Journal { get; } = journal;

    public bool IsEnabled(LogLevel level) => level != LogLevel.None && level >= MinimumLevel;

    public ILogger CreateLogger(string categoryName) => new StderrLogger(this);

    void ILoggerFactory.AddProvider(ILoggerProvider provider) => throw new NotSupportedException("the CLI logs to stderr only");

    public void Dispose()
    {
    }

    /// <summary>
    /// One message, whatever the minimum level (the error a command exits with). The exception goes
    /// with it whole (its stack trace) where it is likely a bug, or when debugging was asked for;
    /// otherwise as its type and message, as the CLI has always said a target's failure.
    /// </summary>
    public void Write(LogLevel level, string message, Exception? exception = null)
    {
        if (exception is not null)
        {
            message = level >= LogLevel.Error || MinimumLevel <= LogLevel.Debug
                ? $"{message}: {exception}"
                : $"{message}: {exception.GetType().Name}: {exception.Message}";
        }
        // One write per message: lines of two threads never interleave.
        _writer.Write(JournalFormat.Lines(level, message, Journal));
        _writer.Flush();
    }

    private sealed class StderrLogger(StderrLoggerProvider provider) : ILogger
    {
        public IDisposable? BeginScope<TState>(TState state)
            where TState : notnull => null;

        public bool IsEnabled(LogLevel logLevel) => provider.IsEnabled(logLevel);

        public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            if (!provider.IsEnabled(logLevel))
            {
                return;
            }
            ArgumentNullException.ThrowIfNull(formatter);
            provider.Write(logLevel, formatter(state, exception), exception);
        }
    }
}
