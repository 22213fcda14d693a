using System.Diagnostics.Metrics;
using UblkSharp.Runtime.Metrics;

namespace UblkSharp.Tests.Runtime;

/// <summary>
/// The UblkSharp meter's observable instruments as a MeterListener reads them, kept only where
/// <c>keep</c> accepts the tags: other tests' devices and servers may be live in this process.
/// </summary>
internal sealed class MeterCapture : IDisposable
{
    private readonly MeterListener _listener = new();
    private readonly Func<Dictionary<string, object?>, bool> _keep;

    public MeterCapture(Func<Dictionary<string, object?>, bool> keep)
    {
        _keep = keep;
        _listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == UblkMeter.Name)
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        _listener.SetMeasurementEventCallback<long>((i, v, tags, _) => Record(i, v, tags));
        _listener.SetMeasurementEventCallback<int>((i, v, tags, _) => Record(i, v, tags));
        _listener.SetMeasurementEventCallback<double>((i, v, tags, _) => Record(i, v, tags));
        _listener.Start();
    }

    public List<(string Name, double Value, Dictionary<string, object?> Tags)> Seen { get; } = [];

    /// <summary>Reads every observable instrument once more, after forgetting what was seen.</summary>
    public void Collect()
    {
        Seen.Clear();
        _listener.RecordObservableInstruments();
    }

    /// <summary>The one measurement of <paramref name="name"/> with these tags.</summary>
    public double One(string name, params (string Key, object Value)[] tags) =>
        Assert.Single(Seen, m => m.Name == name && tags.All(t => Equals(m.Tags.GetValueOrDefault(t.Key), t.Value))).Value;

    public void Dispose() => _listener.Dispose();

    private void Record<T>(Instrument i, T value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
    {
        var t = new Dictionary<string, object?>();
        foreach (var kv in tags)
        {
            t[kv.Key] = kv.Value;
        }
        if (_keep(t))
        {
            Seen.Add((i.Name, Convert.ToDouble(value, System.Globalization.CultureInfo.InvariantCulture), t));
        }
    }
}
