# lpipe.bash: bash completion for lpipe
#
# SPDX-License-Identifier: LGPL-2.1-or-later
#
# Stage and property names come from the registry through `lpipe inspect`,
# run as the command being completed, so plugins found through
# LPIPE_PLUGIN_PATH complete too. Works with or without the bash-completion
# package.

# The stage names, one a line: the first column of `lpipe inspect`.
_lpipe_stages ()
{
  "$1" inspect 2>/dev/null |
    awk '$2 ~ /^(source|transform|sink|aggregator)$/ { print $1 }'
}

# "name<TAB>type" for each property of stage $2: the indented lines after
# "Properties:" in `lpipe inspect STAGE` ("  rank   integer [1, 4096], default 4").
_lpipe_properties ()
{
  "$1" inspect "$2" 2>/dev/null |
    awk '/^Properties:/ { on = 1; next }
         on && /^  [a-z0-9][a-z0-9-]*  / { name = $1; $1 = ""; sub(/^ +/, ""); print name "\t" $0 }'
}

_lpipe ()
{
  local lpipe=$1 line cur command="" stage="" i
  local -a words

  # Split the line ourselves: COMP_WORDS breaks "key=value" at '='.
  line=${COMP_LINE:0:COMP_POINT}
  read -r -a words <<<"$line"
  if [[ $line == *[[:space:]] || ${#words[@]} -eq 0 ]]; then
    cur=""
  else
    cur=${words[${#words[@]}-1]}
    unset 'words[${#words[@]}-1]'
  fi

  # the command, and for launch the stage being written
  for ((i = 1; i < ${#words[@]}; i++)); do
    case ${words[i]} in
      -j|--threads|-r|--rank|-m|--method|-o|--output|-d|--output-dir|--name|--report) ((i++)) ;;
      -*) ;;
      *)
        if [[ -z $command ]]; then
          command=${words[i]}
        elif [[ $command == launch ]]; then
          if [[ ${words[i]} == '!' || ${words[i-1]} == '!' || ${words[i-1]} == launch ]]; then
            stage=${words[i]}
          fi
        fi ;;
    esac
  done
  [[ $stage == '!' ]] && stage=""

  local -a replies=()
  local prev=${words[${#words[@]}-1]-}

  if [[ $prev == -j || $prev == --threads ]]; then
    COMPREPLY=()
    return
  fi

  if [[ $prev == -m || $prev == --method ]]; then
    mapfile -t COMPREPLY < <(compgen -W "exact randomized projection sparse-projection" -- "$cur")
    return
  fi
  if [[ $prev == -o || $prev == --output || $prev == -d || $prev == --output-dir || $prev == --report ]]; then
    compopt -o filenames 2>/dev/null
    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
    return
  fi

  if [[ $cur == -* ]]; then
    replies=(--help --version --quiet --verbose --threads --json)
    case $command in
      reduce)
        replies+=(--rank --method --energy --sv-fro --sv-ratio --sv-cumulative --budget --max-rank
                  --min-rank --pad --seed --niter --oversample --compute-dtype --dtype --output
                  --output-dir --name --report --force --dry-run) ;;
      info) replies+=(--tensors) ;;
    esac
  elif [[ -z $command ]]; then
    replies=(reduce run validate launch inspect info)
  else
    case $command in
      inspect)
        [[ ${#words[@]} -gt 0 && $prev == inspect ]] &&
          mapfile -t replies < <(_lpipe_stages "$lpipe") ;;
      launch)
        if [[ -z $stage ]]; then
          mapfile -t replies < <(_lpipe_stages "$lpipe")
          # '!' to end a stage once it has a name
        elif [[ $cur == *=* ]]; then
          local key=${cur%%=*} type
          type=$(_lpipe_properties "$lpipe" "$stage" | awk -F '\t' -v k="$key" '$1 == k { print $2 }')
          case $type in
            "enum: "*|"one of "*)
              type=${type#enum: }; type=${type#one of }; type=${type%%,*}
              local IFS='|'
              replies=($type)
              unset IFS ;;
            boolean*) replies=(true false) ;;
            string*|"list of"*) compopt -o default 2>/dev/null; COMPREPLY=(); return ;;
          esac
          local v
          local -a prefixed=()
          for v in "${replies[@]}"; do prefixed+=("$key=$v"); done
          replies=("${prefixed[@]}")
        else
          local name
          while IFS=$'\t' read -r name _; do replies+=("$name="); done \
            < <(_lpipe_properties "$lpipe" "$stage")
          replies+=('!')
          compopt -o nospace 2>/dev/null
        fi ;;
      run|validate)
        if [[ $prev == run || $prev == validate ]]; then
          compopt -o filenames 2>/dev/null
          # pipeline files, folders, and the ready pipelines by name
          mapfile -t COMPREPLY < <(compgen -f -X '!*.pipeline' -- "$cur"; compgen -d -- "$cur"
                                   "$lpipe" run 2>&1 | sed -n 's/.*(\([a-z0-9, -]*\)); see lpipe.*/\1/p' |
                                     tr -d ',' | tr ' ' '\n' | grep -- "^$cur")
          return
        fi ;;
      reduce)
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -X '!*.safetensors' -- "$cur"; compgen -d -- "$cur")
        return ;;
      info)
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -X '!*.safetensors' -- "$cur"; compgen -d -- "$cur")
        return ;;
    esac
  fi

  mapfile -t COMPREPLY < <(compgen -W "${replies[*]}" -- "$cur")

  # With '=' in COMP_WORDBREAKS bash replaces only the text after the last
  # '=', so the replies must not repeat what comes before it.
  if [[ $cur == *=* && $COMP_WORDBREAKS == *=* ]]; then
    local strip=${cur%=*}=
    COMPREPLY=("${COMPREPLY[@]#"$strip"}")
  fi
  # a property name ends in '=': the value follows with no space
  if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} != *= ]]; then
    compopt +o nospace 2>/dev/null
  fi
  return 0
}

complete -F _lpipe lpipe
